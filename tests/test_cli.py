import json
import subprocess
import sys

from fused_attn import cli, info


def test_info_reports_build_and_machine(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "extension         loaded" in out
    assert "plain-call entry  C++" in out
    assert "CUDA kernels" in out and "Triton" in out and "GPU" in out
    assert "layer_norm" in out


def test_info_json_facts():
    facts = info.collect()
    assert facts["extension_loaded"], facts["extension_error"]
    assert facts["plain_call_entry"], "the extension loads but has no C++ entry: a build from older sources"
    assert facts["build"].get("torch") == facts["torch"]
    assert "cpu" in facts["available_backends"]["cpu"]
    from fused_attn import _compile_cache
    assert _compile_cache.identity() in facts["compile_cache_tag"].split("+")


def test_info_reports_the_cpu_tile_unit(capsys):
    """Which 16-bit products the CPU kernels run on the tile unit (AMX) is a query, and follows
    torch's oneDNN switch."""
    import torch

    from fused_attn import _extension
    dtypes = _extension.cpu_tile_dtypes()
    assert set(dtypes) <= {"bfloat16", "float16"}
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU tile unit" in out
    assert (", ".join(dtypes) in out) if dtypes else "not used" in out
    with torch.backends.mkldnn.flags(enabled=False):
        assert _extension.cpu_tile_dtypes() == []


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fused_attn", "info"], capture_output=True, text=True, check=True)
    assert "fused-attn" in out.stdout
    assert "compile cache tag fused_attn-" in out.stdout


def test_bench_layer_norm_writes_records(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = cli.main(
        ["bench", "--suite", "layer_norm", "--device", "cpu", "--rows", "64", "--hidden", "32,48", "--repeats", "2",
         "--min-time", "0", "--mode", "fwd+bwd", "--json", str(path)]
    )
    assert code == 0
    records = json.loads(path.read_text())
    timed = [r for r in records if r["skipped"] is None]
    assert {r["impl"] for r in timed} >= {"torch", "reference", "cpu"}
    for r in timed:
        for key in ("suite", "impl", "device", "dtype", "mode", "shape", "median_ms", "min_ms", "max_ms",
                    "speedup_vs_eager", "peak_mem_bytes", "gbps"):
            assert key in r
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    skipped = [r for r in records if r["skipped"] is not None]
    assert any(r["impl"] == "cuda" for r in skipped)
    assert "vs eager" in capsys.readouterr().out
