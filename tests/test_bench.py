"""The benchmark harness, the memory profiler and both subcommands, on tiny inputs.

No timing is asserted: only that work is counted right, memory is measured right, and the
commands run end to end and write what they promise.
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_attn
from fused_attn import _extension, backends, cli
from fused_attn.bench import cli as bench_cli
from fused_attn.bench import harness, suites
from fused_attn.bench.suites import Settings
from fused_attn.profiling import memory

CPU = torch.device("cpu")
RECORD_KEYS = {"suite", "impl", "device", "dtype", "mode", "shape", "median_ms", "min_ms", "max_ms",
               "speedup_vs_eager", "speedup_vs_torch", "peak_fraction", "baseline", "peak_mem_bytes", "interpreted",
               "extension_stale", "kernels", "skipped"}
TIMING_KEYS = ("median_ms", "min_ms", "max_ms", "speedup_vs_eager", "speedup_vs_torch", "peak_mem_bytes")


# ---------------------------------------------------------------------------------------------
# Work counts


def test_attention_flops_usual_count():
    assert harness.attention_flops(2, 3, 5, 7, 11, causal=False, mode="fwd") == 4 * 2 * 3 * 5 * 7 * 11
    assert harness.attention_flops(1, 1, 4, 4, 8, causal=False, mode="fwd+bwd") == 3.5 * 4 * 16 * 8


@pytest.mark.parametrize("q_len, k_len", [(5, 7), (7, 5), (6, 6), (1, 4096), (4096, 1), (128, 512)])
def test_attention_flops_causal_counts_the_pairs_the_mask_keeps(q_len, k_len):
    """Top-left aligned: query i sees keys 0..i. Not half of Lq*Lk when the lengths differ."""
    keep = torch.ones(q_len, k_len, dtype=torch.bool).tril()
    pairs = int(keep.sum())
    assert harness.causal_pairs(q_len, k_len) == pairs
    assert harness.attention_flops(2, 3, q_len, k_len, 11, causal=True, mode="fwd") == 4 * 2 * 3 * pairs * 11
    assert harness.attention_flops(1, 1, q_len, k_len, 8, causal=True, mode="fwd+bwd") == 3.5 * 4 * pairs * 8
    assert harness.causal_pairs(6, 6) == 6 * 7 // 2


def test_ffn_flops_and_rates():
    assert harness.ffn_flops(10, 4, 16, mode="fwd") == 2 * (2 * 10 * 4 * 16)
    assert harness.ffn_flops(10, 4, 16, mode="fwd+bwd") == 3 * harness.ffn_flops(10, 4, 16, mode="fwd")
    assert harness.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert harness.gbps(3e9, 1000.0) == pytest.approx(3.0)


def test_device_peaks_unknown_on_cpu():
    assert harness.device_peaks(CPU) is None


# ---------------------------------------------------------------------------------------------
# Memory accounting


def test_memory_meter_replays_allocations_and_frees():
    with harness.MemoryMeter(CPU) as meter:
        meter.mark("start")
        a = torch.empty(1 << 18)  # 1 MiB
        meter.mark("one")
        b = torch.empty(1 << 19)  # 2 MiB
        meter.mark("two")
        del a
        meter.mark("freed")
        del b
    assert meter.peak_bytes == 3 << 20
    assert (meter.at("start"), meter.at("one"), meter.at("two"), meter.at("freed")) == (0, 1 << 20, 3 << 20, 2 << 20)


def test_peak_memory_of_a_call_excludes_what_was_live_before():
    x = torch.randn(256, 256)

    def call():
        y = x @ x  # 256 KiB, freed before z is made
        del y
        return torch.empty(128, 256)  # 128 KiB, returned

    assert harness.peak_memory(call, CPU) == 256 * 256 * 4


def test_measure_orders_times_and_reports_memory():
    calls = []
    timings, failed = harness.measure_side_by_side({"f": lambda: calls.append(torch.empty(1024))}, CPU, repeats=4,
                                                   warmup=1)
    t = timings["f"]
    assert not failed
    assert len(calls) == 1 + 4 + 1  # warm-up, timed, one profiled
    assert t.min_ms <= t.median_ms <= t.max_ms
    assert t.peak_mem_bytes == 4096


def test_measure_side_by_side_interleaves_rounds_and_reports_failures():
    calls = []

    def failing():
        calls.append("bad")
        raise RuntimeError("this shape is not served\nsecond line")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": failing}
    timings, failed = harness.measure_side_by_side(fns, CPU, repeats=3, warmup=1)
    assert set(timings) == {"a", "b"} and failed == {"bad": "RuntimeError: this shape is not served"}
    # warm-up a, b, bad (fails: left out from then on); three rounds of a, b; one memory call each
    assert calls == ["a", "b", "bad"] + ["a", "b"] * 3 + ["a", "b"]
    assert all(t.min_ms <= t.median_ms <= t.max_ms and t.peak_mem_bytes == 0 for t in timings.values())


def test_min_time_samples_fast_calls_more_and_keeps_rounds_interleaved(monkeypatch):
    # A fake clock: each call of "slow" takes 10 ms, of "fast" 1 ms, so the rounds are exact.
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    calls = []

    def taking(name, ms):
        def call():
            calls.append(name)
            now[0] += ms / 1e3
        return call

    fns = {"slow": taking("slow", 10.0), "fast": taking("fast", 1.0)}
    timings, _ = harness.measure_side_by_side(fns, CPU, repeats=3, warmup=0, min_time_s=0.025)
    timed = calls[:-2]  # the last two: one memory call each
    # slow: 3 calls (30 ms >= 25 ms); fast: 25 calls; slow takes part in the first rounds only
    assert timed == ["slow", "fast"] * 3 + ["fast"] * 22
    assert timings["slow"].median_ms == pytest.approx(10.0) and timings["fast"].median_ms == pytest.approx(1.0)

    calls.clear()
    harness.measure_side_by_side(fns, CPU, repeats=2, warmup=0, min_time_s=10.0, max_repeats=7)
    assert calls[:-2] == ["slow", "fast"] * 7  # capped
    calls.clear()
    harness.measure_side_by_side(fns, CPU, repeats=2, warmup=0)
    assert calls[:-2] == ["slow", "fast"] * 2  # no minimum time: exactly the repeats


def test_timings_report_the_median_not_the_mean(monkeypatch):
    """median_ms is the median of the timed calls: one slow call among three (1, 1 and 10 ms on a
    fake clock) leaves it at 1 ms, where the mean would be 4 ms."""
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    durations = iter([1.0, 1.0, 10.0])

    def call():
        now[0] += next(durations, 0.0) / 1e3  # the memory call after the timed ones takes 0 ms

    timings, failed = harness.measure_side_by_side({"f": call}, CPU, repeats=3, warmup=0)
    t = timings["f"]
    assert not failed
    assert (t.min_ms, t.median_ms, t.max_ms) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(10.0))


class _Saver(nn.Module):
    """Multiplies by a fresh tensor: autograd saves it (the other operand's gradient needs it)."""

    def forward(self, x):
        return x * torch.ones_like(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 32, bias=False)
        self.saver = _Saver()

    def forward(self, x):
        return self.saver(self.linear(x))


def test_profile_model_per_module_activation_and_saved_bytes():
    x = torch.randn(32, 32)
    result = memory.profile_model(_Net(), lambda m: m(x), CPU, training=True)
    rows = {m.name: m for m in result.modules}
    act = 32 * 32 * 4
    assert rows["linear"].activation_bytes == act  # its output
    assert rows["linear"].self_saved_bytes == act  # x (the weight is a parameter: not counted)
    assert rows["saver"].self_saved_bytes == act  # the fresh tensor
    assert rows["saver"].activation_bytes == 2 * act  # the product and the saved tensor
    # The linear's output is not saved (the product's gradient needs only the fresh tensor), so it
    # is freed when the model returns: the product and the fresh tensor stay.
    assert rows["(model)"].saved_bytes == 2 * act and rows["(model)"].activation_bytes == 2 * act
    assert result.peak_bytes >= 3 * act  # forward live set; the backward adds gradients
    inference = memory.profile_model(_Net(), lambda m: m(x), CPU, training=False)
    assert all(m.saved_bytes == 0 for m in inference.modules)


class _Squarer(nn.Module):
    """x * x: autograd saves x twice (as either operand's other factor), one storage."""

    def forward(self, x):
        return x * x


def test_profile_model_counts_a_storage_saved_twice_once():
    """A tensor saved for backward twice (both operands of a product) is one storage: its bytes
    count once, in the module that saved it and in the model's total."""
    x = torch.randn(32, 32)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), _Squarer())
    result = memory.profile_model(model, lambda m: m(x), CPU, training=True)
    rows = {m.name: m for m in result.modules}
    act = 32 * 32 * 4
    assert rows["0"].self_saved_bytes == act  # x (the weight is a parameter: not counted)
    assert rows["1"].self_saved_bytes == act  # the linear's output, saved as both factors
    assert rows["(model)"].saved_bytes == result.saved_bytes == 2 * act


def test_profile_model_has_the_model_row_when_the_step_calls_its_parts():
    # The Transformer workload's step calls encode and decode, never the model's forward: the
    # model's row is then the whole step's, with the same figures a forward would have had.
    x = torch.randn(32, 32)
    result = memory.profile_model(_Net(), lambda m: m.saver(m.linear(x)), CPU, training=True)
    rows = {m.name: m for m in result.modules}
    act = 32 * 32 * 4
    assert rows["(model)"].calls == 1 and rows["(model)"].type == "_Net"
    assert rows["(model)"].saved_bytes == 2 * act and rows["(model)"].activation_bytes == 2 * act


# ---------------------------------------------------------------------------------------------
# fused-attn bench


def _run(args, capsys):
    """Runs the command line. A bench run keeps to its --repeats (--min-time 0 unless given), so
    that a test's tiny cases are not each sampled for the CPU default's quarter of a second."""
    if args[0] == "bench" and "--min-time" not in args:
        args = [*args, "--min-time", "0"]
    code = cli.main(args)
    return code, capsys.readouterr()


def test_bench_attention_json_csv_plot(tmp_path, capsys):
    out = tmp_path / "a.json"
    code, captured = _run(
        ["bench", "--suite", "attention", "--device", "cpu", "--batch", "1", "--heads", "2", "--head-dim", "16",
         "--seq", "16,32", "--causal", "true", "--mode", "fwd+bwd", "--repeats", "2", "--no-compile",
         "--json", str(out), "--csv", str(tmp_path / "a.csv"), "--plot", str(tmp_path / "a.png")], capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text())
    assert all(set(r) == RECORD_KEYS | {"tflops"} for r in records)  # one schema for every record
    timed = [r for r in records if r["skipped"] is None]
    assert {r["impl"] for r in timed} >= {"eager", "torch", "reference", "cpu"}
    for r in timed:
        assert RECORD_KEYS <= set(r) and "tflops" in r and r["baseline"] == "eager"
        assert r["speedup_vs_torch"] > 0
        assert r["suite"] == "attention" and r["mode"] == "fwd+bwd" and r["shape"]["causal"] is True
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["peak_mem_bytes"] > 0
        assert r["tflops"] == pytest.approx(
            harness.attention_flops(1, 2, r["shape"]["seq"], r["shape"]["seq"], 16, causal=True, mode="fwd+bwd")
            / (r["median_ms"] * 1e9))
    skipped = [r for r in records if r["skipped"] is not None]
    assert {r["impl"] for r in skipped} >= {"cuda", "flash-attn", "xformers", "torch-flash"}
    assert all(isinstance(r["skipped"], str) and r["skipped"] for r in skipped)
    assert all(r[key] is None for r in skipped for key in (*TIMING_KEYS, "tflops"))
    if not torch.cuda.is_available():  # the backend cannot run here at all: that reason alone
        assert {r["skipped"] for r in skipped if r["impl"] == "cuda"} == {"the cuda backend runs on CUDA tensors, got cpu"}
    rows = list(csv.DictReader((tmp_path / "a.csv").open()))
    assert len(rows) == len(records) and all(row["median_ms"] == "" for row in rows if row["skipped"])
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not run:" in captured.out and "FLOP/s" in captured.out


def test_bench_kernels_says_where_each_implementations_time_goes(tmp_path, capsys):
    """--kernels: one more call of each timed implementation, profiled; on a CPU each op's own time,
    summed per name (the fused backend's time in its own ops, eager's in its GEMMs), in the JSON and
    as a section of the table. Without the flag the records' kernels are null."""
    out = tmp_path / "k.json"
    code, captured = _run(
        ["bench", "--suite", "attention", "--device", "cpu", "--batch", "1", "--heads", "2", "--head-dim", "16",
         "--seq", "64", "--causal", "false", "--mode", "fwd+bwd", "--repeats", "1", "--no-compile", "--kernels",
         "--json", str(out), "--csv", str(tmp_path / "k.csv")], capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text())
    rows = list(csv.DictReader((tmp_path / "k.csv").open()))
    assert [json.loads(row["kernels"]) if row["kernels"] else None for row in rows] == [r["kernels"] for r in records]
    timed = {r["impl"]: r for r in records if r["skipped"] is None}
    for r in timed.values():
        kernels = r["kernels"]
        assert set(kernels) == {"total_ms", "top"} and 0 < len(kernels["top"]) <= 7
        assert kernels["total_ms"] == pytest.approx(sum(k["ms"] for k in kernels["top"]))
        assert all(k["ms"] >= 0 and k["calls"] >= 1 for k in kernels["top"])
    names = lambda impl: [k["name"] for k in timed[impl]["kernels"]["top"]]  # noqa: E731
    assert {"fused_attn::attention_fwd", "fused_attn::attention_bwd"} <= set(names("cpu"))
    assert "aten::bmm" in names("eager") and not any(n.startswith("fused_attn::") for n in names("eager"))
    section = captured.out.split("where the time goes")[1]
    assert "attention B1 H2 L64 D16 full fwd+bwd cpu: " in section and "fused_attn::attention_bwd " in section
    _run(["bench", "--suite", "attention", "--device", "cpu", "--batch", "1", "--heads", "2", "--head-dim", "16",
          "--seq", "64", "--causal", "false", "--mode", "fwd", "--repeats", "1", "--no-compile", "--json", str(out)],
         capsys)
    assert all(r["kernels"] is None for r in json.loads(out.read_text()))


@pytest.mark.cuda
def test_bench_kernels_on_a_gpu_lists_each_backends_attention_kernels(tmp_path, capsys):
    """--kernels on a GPU, as gpu-check runs it: the device kernels of one profiled call by name, the
    cuda backend's forward, statistics, dK/dV and dQ kernels and the Triton backend's apart."""
    out = tmp_path / "k.json"
    code, captured = _run(["bench", "--suite", "attention", "--device", "cuda", "--batch", "1", "--heads", "2",
                           "--seq", "256", "--causal", "false", "--mode", "fwd+bwd", "--repeats", "2", "--no-compile",
                           "--backends", "cuda,triton", "--kernels", "--json", str(out)], capsys)
    assert code == 0, captured.err
    timed = {r["impl"]: r for r in json.loads(out.read_text()) if r["skipped"] is None}
    names = {impl: [k["name"] for k in r["kernels"]["top"]] for impl, r in timed.items()}
    for impl, kernels in (("cuda", ("attn_fwd_kernel<", "attn_bwd_dkdv_kernel<", "attn_bwd_dq_kernel<")),
                          ("triton", ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"))):
        for kernel in kernels:
            assert any(name.startswith(kernel) for name in names[impl]), (impl, kernel, names[impl])
    assert sum(name.startswith("attn_bwd_dq_kernel<") for name in names["cuda"]) == 2  # statistics and dQ
    assert all(r["kernels"]["total_ms"] > 0 for r in timed.values())


def test_kernel_times_on_a_gpu_sum_the_device_kernels_by_name(monkeypatch):
    """The CUDA side of --kernels, with the profiler's own event type standing in for a GPU's trace:
    device kernels' durations summed per shortened name, the CPU ops beside them left out, names past
    the top ones summed into 'other'."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(i, name, us, device_type=DeviceType.CUDA):
        return FunctionEvent(id=i, name=name, thread=0, start_us=100 * i, end_us=100 * i + us, device_type=device_type)

    kernel = "void fused_attn::(anonymous namespace)::attn_bwd_dq_kernel<c10::BFloat16, 64, true, 2>(BwdParams)"
    events = [event(1, "aten::empty", 500, DeviceType.CPU), event(2, kernel, 30), event(3, kernel, 20),
              event(4, "_attn_fwd_kernel", 40)] + [event(5 + i, f"k{i}", 1) for i in range(7)]

    class Profile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    result = harness.kernel_times(lambda: calls.append(1), torch.device("cuda"), top=3)
    assert calls == [1]
    assert result["top"][:3] == [{"name": "attn_bwd_dq_kernel<BFloat16, 64, true, 2>", "ms": 0.05, "calls": 2},
                                 {"name": "_attn_fwd_kernel", "ms": 0.04, "calls": 1},
                                 {"name": "k0", "ms": 0.001, "calls": 1}]
    assert result["top"][3]["name"] == "other" and result["top"][3]["calls"] == 6
    assert result["total_ms"] == pytest.approx(0.097)


def test_kernel_names_are_shortened_to_what_tells_them_apart():
    name = harness.kernel_name
    assert name("void fused_attn::(anonymous namespace)::attn_bwd_dkdv_kernel<c10::BFloat16, 64, 2>"
                "(fused_attn::(anonymous namespace)::BwdParams)") == "attn_bwd_dkdv_kernel<BFloat16, 64, 2>"
    assert name("aten::mm") == "aten::mm" and name("fused_attn::attention_bwd") == "fused_attn::attention_bwd"
    assert name("_attn_fwd_kernel") == "_attn_fwd_kernel" and name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD"
    assert len(name("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute")) == 64


@pytest.mark.parametrize("suite, sizes", [
    ("softmax", ["--batch", "1", "--heads", "2", "--seq", "24"]),
    ("layer_norm", ["--rows", "16", "--hidden", "40"]),
    ("add_layer_norm", ["--rows", "16", "--hidden", "40"]),
    ("ffn", ["--rows", "8", "--hidden", "24"]),
])
def test_bench_memory_bound_and_ffn_suites(suite, sizes, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", suite, "--device", "cpu", "--repeats", "1", "--no-compile",
                           "--mode", "fwd+bwd", "--json", str(out), *sizes], capsys)
    assert code == 0, captured.err
    rate = "tflops" if suite == "ffn" else "gbps"
    records = json.loads(out.read_text())
    assert all(set(r) == RECORD_KEYS | {rate} for r in records)
    timed = [r for r in records if r["skipped"] is None]
    assert all(r[rate] > 0 for r in timed)
    assert {r["impl"] for r in timed} >= {"torch", "reference", "cpu"}
    # Each memory-bound suite has the bandwidth yardstick, which computes nothing: a rate, no speed-up.
    assert ("copy" in {r["impl"] for r in timed}) == (suite != "ffn")
    for r in timed:
        assert (r["speedup_vs_eager"] is None) == (r["impl"] == "copy"), r


def test_copy_yardstick_moves_the_ops_bytes_into_new_tensors_of_the_ops_output_size():
    """The yardstick reads and writes as many bytes as the op moves, writing them as the op writes its
    output: into tensors allocated by the call (not a kept buffer), on a CPU each no larger than the
    output."""
    import torch

    from fused_attn.bench.suites import _copy

    like = torch.empty(16, 40)
    moved = 5 * like.numel() * like.element_size()  # LayerNorm's forward + backward
    run = _copy(moved, like)
    first, second = run(), run()
    assert sum(t.numel() * t.element_size() for t in first) * 2 == moved
    assert all(t.numel() <= like.numel() for t in first) and len(first) == 3
    assert all(a.data_ptr() != b.data_ptr() for a in first for b in second)
    # Elsewhere (a GPU's caching allocator has no first-touch cost) one copy of it all, one launch.
    (whole,) = _copy(moved, like.to("meta"))()
    assert whole.numel() * whole.element_size() * 2 == moved


def test_bench_speedups_are_the_baseline_time_over_the_implementation_time(tmp_path, capsys):
    """speedup_vs_eager is the baseline's median over the implementation's (above 1: faster than the
    baseline), speedup_vs_torch torch's median over it; the baseline itself is at exactly 1."""
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "layer_norm", "--device", "cpu", "--repeats", "3", "--no-compile",
                           "--mode", "fwd+bwd", "--rows", "16", "--hidden", "40", "--json", str(out)], capsys)
    assert code == 0, captured.err
    timed = {r["impl"]: r for r in json.loads(out.read_text()) if r["skipped"] is None}
    baseline = timed[next(iter(timed.values()))["baseline"]]["median_ms"]
    torch_ms = timed["torch"]["median_ms"]
    compared = [r for name, r in timed.items() if name != "copy"]
    assert {r["impl"] for r in compared} >= {"torch", "reference", "cpu"}
    for r in compared:
        assert r["speedup_vs_eager"] == pytest.approx(baseline / r["median_ms"]), r
        assert r["speedup_vs_torch"] == pytest.approx(torch_ms / r["median_ms"]), r
    assert timed[compared[0]["baseline"]]["speedup_vs_eager"] == pytest.approx(1.0)


@pytest.mark.parametrize("suite, sizes, moved", [
    # fwd+bwd: the forward reads x and writes y, the backward reads dy and x (the output for softmax)
    # and writes dx; Add & Norm's reads the residual too and writes the pre-norm sum and two gradients.
    ("softmax", ["--batch", "1", "--heads", "2", "--seq", "24"], 1 * 2 * 24 * 24 * 4 * 5),
    ("layer_norm", ["--rows", "16", "--hidden", "40"], 16 * 40 * 4 * 5),
    ("add_layer_norm", ["--rows", "16", "--hidden", "40"], 16 * 40 * 4 * 8),
])
def test_bench_gbps_counts_the_bytes_the_op_must_move(suite, sizes, moved, tmp_path, capsys):
    """A memory-bound suite's GB/s is the bytes its op must move (float32: 4 bytes an element) over
    the median time, for every implementation, the copy yardstick included."""
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", suite, "--device", "cpu", "--repeats", "1", "--no-compile",
                           "--mode", "fwd+bwd", "--dtype", "float32", "--json", str(out), *sizes], capsys)
    assert code == 0, captured.err
    timed = [r for r in json.loads(out.read_text()) if r["skipped"] is None]
    assert {r["impl"] for r in timed} >= {"torch", "reference", "cpu"}
    for r in timed:
        assert r["gbps"] == pytest.approx(moved / (r["median_ms"] * 1e6)), r


def test_bench_model_suite_plain_optimized_compiled(tmp_path, capsys):
    out = tmp_path / "m.json"
    code, captured = _run(["bench", "--suite", "model", "--models", "bert-tiny", "--device", "cpu", "--batch", "2",
                           "--seq", "16", "--layers", "1", "--mode", "fwd", "--repeats", "1", "--json", str(out)],
                          capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text())
    by_impl = {r["impl"]: r for r in records}
    assert set(by_impl) == {"plain", "optimized", "compiled"}
    for r in by_impl.values():
        assert r["skipped"] is None, r
        assert r["shape"] == {"model": "bert-tiny", "layers": 1, "batch": 2, "seq": 16}
        assert r["tokens_per_s"] == pytest.approx(32 / (r["median_ms"] * 1e-3))
    assert by_impl["plain"]["speedup_vs_eager"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["bench", "--suite", "nope"], "invalid choice: 'nope'"),
    (["bench", "--seq", "0"], "expected a positive integer, got 0"),
    (["bench", "--seq", "12,abc"], "expected a positive integer, got 'abc'"),
    (["bench", "--backends", "cuda", "--device", "cpu"], "'cuda' cannot run on cpu here"),
    (["bench", "--backends", "tpu"], "unknown backend 'tpu'"),
    (["bench", "--min-time", "-1"], "expected a finite number of seconds >= 0, got -1"),
    (["bench", "--min-time", "inf"], "expected a finite number of seconds >= 0, got inf"),
    (["bench", "--min-time", "1s"], "expected a number of seconds, got '1s'"),
    (["bench", "--suite", "model", "--models", "gpt"], "unknown model 'gpt'"),
    (["bench", "--device", "cuda"], "no CUDA device"),
    (["profile-memory", "--seq", "-3"], "expected a positive integer, got -3"),
    (["profile-memory", "--device", "cpu", "--snapshot", "x.pickle"], "--snapshot needs --device cuda"),
    # Output paths are checked before anything runs.
    (["bench", "--json", "/nonexistent-folder/r.json"], "folder /nonexistent-folder does not exist"),
    (["bench", "--csv", "/nonexistent-folder/r.csv"], "folder /nonexistent-folder does not exist"),
    (["bench", "--json", "/tmp"], "/tmp: is a directory"),
    (["bench", "--json", "new-folder/"], "new-folder/: names a folder; expected a file name"),
    # Writable by permission bits (as root), but not a place a file can be made.
    (["bench", "--json", "/proc/r.json"], "--json /proc/r.json: cannot be written"),
    (["bench", "--csv", "/sys/r.csv"], "--csv /sys/r.csv: cannot be written"),
    (["profile-memory", "--json", "/proc/p.json"], "--json /proc/p.json: cannot be written"),
    # A layer count past any memory is refused from its size estimate, before anything is built.
    (["profile-memory", "--model", "bert-tiny", "--layers", "2147483647", "--seq", "32"],
     "needs at least 4679.0 TiB"),
    (["bench", "--suite", "model", "--models", "bert-tiny", "--layers", "2147483647", "--seq", "32"],
     "--batch, --seq and --layers set the model suite's sizes"),
    (["bench", "--plot", "/tmp"], "/tmp: is a directory"),
    (["bench", "--suite", "attention", "--device", "cpu", "--kv-heads", "5"],
     "--kv-heads 5 must divide the attention heads, 12 (the default; --heads sets them)"),
    (["bench", "--suite", "attention", "--heads", "4", "--kv-heads", "3"], "--kv-heads 3 must divide the attention heads, 4"),
    (["bench", "--suite", "attention", "--padding", "1"], "--padding: expected a fraction of the keys in [0, 1), got 1"),
    (["bench", "--suite", "attention", "--padding", "half"],
     "--padding: expected a fraction of the keys in [0, 1), got 'half'"),
    (["bench", "--suite", "attention", "--dropout", "1"], "--dropout: expected a dropout probability in [0, 1), got 1"),
    (["bench", "--plot", "bench.notanext"], "expected a file name ending in .png, .svg, .pdf"),
    (["profile-memory", "--json", "/nonexistent-folder/p.json"], "folder /nonexistent-folder does not exist"),
    (["profile-memory", "--plot", "/tmp"], "/tmp: is a directory"),
])
def test_bad_arguments_one_line_error(args, message, capsys):
    if "--device" in args and "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_output_probe_changes_nothing_on_disk(tmp_path):
    """Checking an output path up front leaves an existing file's bytes, a dangling link (the run's
    own open makes its target) and a folder without a new file, as they were."""
    from fused_attn.bench.cli import check_output

    existing, link, new = tmp_path / "old.json", tmp_path / "link.json", tmp_path / "new.json"
    existing.write_text("keep")
    link.symlink_to(tmp_path / "target.json")
    for path in (existing, link, new):
        check_output(str(path), "--json")
    assert existing.read_text() == "keep" and link.is_symlink() and not (tmp_path / "target.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "old.json"]


def test_bad_arguments_from_the_shell_no_traceback():
    for args in (["bench", "--seq", "x"], ["bench", "--backends", "tpu"]):
        proc = subprocess.run([sys.executable, "-m", "fused_attn", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------------------------
# fused-attn profile-memory


def test_profile_memory_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    code, captured = _run(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--batch", "2", "--seq", "64",
                           "--device", "cpu", "--json", str(out), "--plot", str(png)], capsys)
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert set(result) >= {"plain", "fused", "ratio"}
    for side in ("plain", "fused"):
        assert result[side]["peak_bytes"] > 0
        names = {m["name"] for m in result[side]["modules"]}
        assert {"(model)", "encoder.layer.0.attention.self"} <= names
        for m in result[side]["modules"]:
            assert {"name", "type", "activation_bytes", "saved_bytes"} <= set(m)
    assert result["ratio"] == pytest.approx(result["fused"]["peak_bytes"] / result["plain"]["peak_bytes"])
    # The plain attention keeps the [B, H, L, L] probabilities (and dropout mask) for backward; the
    # fused one keeps q, k, v, the output and the row log-sum-exp.
    attn = {side: next(m for m in result[side]["modules"] if m["name"] == "encoder.layer.0.attention.self")
            for side in ("plain", "fused")}
    assert attn["fused"]["saved_bytes"] < attn["plain"]["saved_bytes"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "fused/plain" in captured.out


def test_profile_memory_table_names_types_in_full():
    from fused_attn.profiling.cli import format_table

    def side(kind):
        return {"peak_bytes": 2**20, "forward_peak_bytes": 2**20, "saved_bytes": 0, "modules": [
            {"name": "encoder.layer.0.output", "type": kind, "activation_bytes": 2**20, "saved_bytes": 0}]}

    result = {"plain": side("BertSelfOutput"), "fused": side("FusedBertSelfOutput"), "mode": "fwd", "ratio": 1.0}
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("encoder.layer.0.output"))
    assert "BertSelfOutput->FusedBertSelfOutput " in row
    assert len({len(line) for line in table.splitlines()[:4]}) == 1  # header, rule and row line up


def test_gpu_check_report_renders_tables_plots_and_memory(tmp_path, monkeypatch):
    """`make gpu-check` runs where time is scarce: its report writer is exercised here on records
    like the ones a GPU run makes."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    shape = {"batch": 4, "heads": 16, "seq": 1024, "head_dim": 64, "causal": False}
    records = [
        {"suite": "attention", "impl": impl, "device": "cuda", "dtype": "bfloat16", "mode": "fwd",
         "shape": {**shape, "seq": seq}, "median_ms": ms, "min_ms": ms, "max_ms": ms, "speedup_vs_eager": 1.0,
         "peak_mem_bytes": 2**20, "tflops": 100.0 / ms, "peak_fraction": 0.1}
        for impl, ms in (("torch", 1.0), ("cuda", 0.8)) for seq in (1024, 2048)
    ] + [{"suite": "attention", "impl": "xformers", "device": "cuda", "dtype": "bfloat16", "mode": "fwd",
          "shape": shape, "skipped": "not installed (pip install xformers)"}]
    # A --kernels run's record: its own section, out of the sweep's table and plots.
    kernels = {"total_ms": 3.5, "top": [{"name": "attn_bwd_dkdv_kernel<BFloat16, 64, 2>", "ms": 2.0, "calls": 1},
                                        {"name": "attn_bwd_dq_kernel<BFloat16, 64, false, 2>", "ms": 1.5, "calls": 2}]}
    records.append({**records[2], "shape": {**shape, "seq": 4096}, "mode": "fwd+bwd", "median_ms": 3.6,
                    "kernels": kernels})
    records.append({**records[2], "shape": {**shape, "seq": 4096}, "mode": "fwd+bwd", "impl": "triton",
                    "kernels": {"skipped": "RuntimeError: CUPTI unavailable"}})
    plots = gpu_check.write_plots(records, "stem")
    assert plots == {"attention": "stem-attention.png"} and (tmp_path / "stem-attention.png").exists()
    records[0]["extension_stale"] = "the sources changed since it was built"
    memory = {"plain": {"peak_bytes": 4 << 20, "forward_peak_bytes": 2 << 20, "saved_bytes": 2 << 20, "modules": []},
              "fused": {"peak_bytes": 1 << 20, "forward_peak_bytes": 1 << 20, "saved_bytes": 1 << 19, "modules": []},
              "ratio": 0.25, "forward_ratio": 0.5, "saved_ratio": 0.25, "plot": None}
    facts = {"gpu": "H200", "date": "today", "torch": "2", "torch_cuda": "13", "triton": "3", "fused_attn": "0"}
    tests = {"exit_code": 1, "tests": 3, "failures": 1, "errors": 0, "skipped": 1, "tail": "",
             "failed_tests": [{"test": "tests.test_x::test_y", "message": "boom"}]}
    host_time = {"records": [{"op": "layer_norm", "grad": grad, "entry_us": 10.0 + grad, "python_us": 40.0,
                              "torch_us": 8.0, "triton_us": 90.0 + grad} for grad in (False, True)]}
    host_time["records"].append({"op": "softmax", "grad": False, "entry_us": 5.0, "python_us": 9.0, "torch_us": 5.0})
    md = gpu_check.render_markdown(facts, tests, records, {"skipped": "--skip-sanitizer"}, plots, memory, host_time)
    assert "| layer_norm | 10.0 / 11.0 | 40.0 / 40.0 | 8.0 / 8.0 | 1.25 / 1.38 | 90.0 / 91.0 |" in md
    assert "| softmax | 5.0 | 9.0 | 5.0 | 1.00 | - |" in md  # no triton column (a machine without triton)
    assert "1 passed, 1 failed" in md and "FAILED `tests.test_x::test_y`: boom" in md
    assert "![attention](stem-attention.png)" in md and "fused/plain 0.250" in md
    assert "forward peak: plain 2 MiB, fused 1 MiB, fused/plain 0.500" in md
    assert "saved for backward: plain 2 MiB, fused 0 MiB, fused/plain 0.250" in md
    assert "extension was stale when timed** (the sources changed since it was built)" in md
    assert "| attention | B4 H16 L2048 D64 full | bfloat16 | fwd | cuda |" in md and "10%" in md
    assert "| 1.00x | - | 1 |" in md  # no speedup_vs_torch in these records
    assert "attention `xformers` (1 case): not installed" in md
    assert "B4 H16 L4096" not in md.split("### Where the time goes")[0]
    assert ("| B4 H16 L4096 D64 full | fwd+bwd | cuda | 3.6000 | 3.500 ms: attn_bwd_dkdv_kernel<BFloat16, 64, 2> "
            "2.000; attn_bwd_dq_kernel<BFloat16, 64, false, 2> 1.500 (2 calls) |") in md
    assert "| triton | 0.8000 | not profiled: RuntimeError: CUPTI unavailable |" in md


def test_profile_memory_interrupted_says_so_in_one_line(capsys, monkeypatch):
    from fused_attn.profiling import memory

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(memory, "profile_model", interrupted)
    code = cli.main(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--seq", "16", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["fused-attn profile-memory: interrupted"], err


def test_bench_interrupted_reports_the_finished_cases(tmp_path, capsys, monkeypatch):
    """Ctrl-C, or gpu-check's --budget running out (SIGINT), still writes what was measured."""
    from fused_attn.bench import cli as bench_cli

    real_run_case, calls = bench_cli.run_case, []

    def run_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(bench_cli, "run_case", run_case)
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "layer_norm", "--device", "cpu", "--rows", "8", "--hidden", "16,24",
                           "--repeats", "1", "--no-compile", "--json", str(out)], capsys)
    assert code == 130 and "interrupted: reporting the" in captured.out
    records = json.loads(out.read_text())
    assert records and {r["shape"]["hidden"] for r in records} == {16}


def test_host_time_script_writes_its_records(tmp_path):
    """benchmarks/host_time.py, which gpu-check runs on the GPU, end to end on tiny counts."""
    path = tmp_path / "host.json"
    subprocess.run([sys.executable, "benchmarks/host_time.py", "--both", "--calls", "2", "--repeats", "1",
                    "--json", str(path)], cwd=Path(__file__).resolve().parent.parent, check=True,
                   capture_output=True, text=True)
    records = json.loads(path.read_text())
    assert len(records) == 14 and {r["grad"] for r in records} == {False, True}
    assert all(r["entry_us"] > 0 and r["python_us"] > 0 and r["torch_us"] > 0 for r in records)


@pytest.mark.parametrize("how", ["module", "script"])
def test_host_time_runs_where_the_package_is_built_in_place_not_installed(tmp_path, how):
    """gpu-check's host-time stage on a machine where the package is built in the repository, not
    installed: a Python that reads no site .pth files (so no editable install), torch from its
    site-packages on PYTHONPATH."""
    import site

    from benchmarks import gpu_check

    python = tmp_path / "bare-python"
    paths = os.pathsep.join(site.getsitepackages())
    python.write_text(f'#!/bin/sh\nPYTHONPATH={paths} exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    root = Path(__file__).resolve().parent.parent
    probe = subprocess.run([str(python), "-c", "import fused_attn"], cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'fused_attn'" in probe.stderr  # not installed for it
    if how == "module":
        result = gpu_check.run_host_time(str(python), tmp_path, timeout=300, device="cpu", calls=2, repeats=1)
        assert "failed" not in result, result.get("failed")
        records = result["records"]
    else:
        path = tmp_path / "host.json"
        subprocess.run([str(python), str(root / "benchmarks" / "host_time.py"), "--calls", "2", "--repeats", "1",
                        "--json", str(path)], cwd=tmp_path, check=True, capture_output=True, text=True)
        records = json.loads(path.read_text())
    assert len(records) == (14 if how == "module" else 7)


def test_gpu_check_stage_runner_interrupts_and_keeps_partial_output():
    from benchmarks import gpu_check

    child = ("import time\n"
             "try:\n    print('started', flush=True); time.sleep(60)\n"
             "except KeyboardInterrupt:\n    print('wrote what it had', flush=True)\n")
    code, output = gpu_check._run([sys.executable, "-c", child], timeout=2)
    assert code == 124 and "wrote what it had" in output and "[interrupted after 2s]" in output
    code, output = gpu_check._run([sys.executable, "-c", "print('quick')"], timeout=30)
    assert code == 0 and "quick" in output


def test_gpu_check_budget_shares_and_skips(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    assert gpu_check.Budget(None).share(900) == 900
    assert gpu_check.Budget(10_000).share(900) == 900
    assert gpu_check.Budget(1000).share(900, 0.5) == 500 - gpu_check.RESERVE - gpu_check.GRACE
    roomy = gpu_check.Budget(gpu_check.RESERVE + gpu_check.GRACE + 100).share(900)
    assert 90 <= roomy <= 100
    spent = gpu_check.Budget(gpu_check.RESERVE + gpu_check.GRACE + gpu_check.MIN_STAGE - 5)
    assert spent.share(900) is None
    stages = {}
    records, _ = gpu_check.run_benchmarks(sys.executable, tmp_path, ["attention", "ffn"], False, spent, stages)
    assert [(r["suite"], r["mode"]) for r in records] == [
        ("attention", "fwd"), ("attention", "fwd+bwd"), ("attention", "fwd+bwd"), ("attention", "fwd"),
        ("attention", "fwd+bwd"), ("attention", "fwd"), ("attention", "fwd+bwd"), ("attention", "fwd+bwd"),
        ("ffn", "fwd+bwd"), ("ffn", "fwd"), ("attention", "fwd"), ("ffn", "fwd"), ("ffn", "fwd+bwd")]
    assert "the bfloat16 fwd+bwd --activation relu run: not started" in records[-1]["skipped"]
    assert "the bfloat16 fwd+bwd --seq 4096 --kernels run: not started" in records[2]["skipped"]
    assert ("the bfloat16 fwd --backends cuda --seq 1024,4096,16384 FUSED_ATTN_CUDA_BLOCK_ROWS=64 run: not started"
            in records[3]["skipped"])
    assert "the bfloat16 fwd --head-dim 128 --seq 1024,4096,16384 run: not started" in records[5]["skipped"]
    assert "the bfloat16 fwd+bwd --dropout 0.1 --causal false --seq 1024,4096 run: not started" in records[7]["skipped"]
    assert stages == {}  # nothing ran
    assert all("not started, the --budget was spent" in r["skipped"] and r["device"] == "cuda" for r in records)
    facts = {"gpu": "H200", "date": "today", "torch": "2", "torch_cuda": "13", "triton": "3", "fused_attn": "0"}
    tests = {"exit_code": 124, "tests": 10, "failures": 0, "errors": 0, "skipped": 2, "tail": "", "failed_tests": [],
             "selection": "tests marked cuda", "interrupted": "stopped after 300s (--budget)"}
    sanitizer = {"memcheck": {"exit_code": 0, "summary": "ERROR SUMMARY: 0 errors", "tail": ""},
                 "racecheck": {"exit_code": None, "summary": "not run: the --budget was spent", "tail": ""}}
    md = gpu_check.render_markdown(facts, tests, records, sanitizer, {}, {})
    assert "8 passed, 0 failed" in md and "tests marked cuda" in md and "interrupted: stopped after 300s" in md
    assert "- memcheck: clean ERROR SUMMARY: 0 errors" in md and "- racecheck: not run: the --budget was spent" in md
    assert "attention `all` (2 cases): the bfloat16 fwd run: not started" not in md
    assert "attention `all` (1 case): the bfloat16 fwd run: not started, the --budget was spent" in md


def test_gpu_check_run_with_its_own_environment_keeps_its_fused_rows_renamed(tmp_path, monkeypatch):
    """A sweep run with an environment of its own (the cuda forward's one-strip layout) reaches the
    bench with it, and only its fused backends' rows, named with it, join the report."""
    from benchmarks import gpu_check

    calls = []

    def fake_run(cmd, timeout, env=None):
        calls.append((cmd, env))
        path = Path(cmd[cmd.index("--json") + 1])
        path.write_text(json.dumps([{"suite": "attention", "impl": impl, "mode": "fwd"} for impl in
                                    ("eager", "torch", "torch-flash", "cuda", "triton")]))
        return 0, ""

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    monkeypatch.setattr(gpu_check, "PRIORITY", [
        ("attention", "bfloat16", "fwd", ()),
        ("attention", "bfloat16", "fwd", ("--backends", "cuda"), {"FUSED_ATTN_CUDA_BLOCK_ROWS": "64"})])
    stages = {}
    records, _ = gpu_check.run_benchmarks(sys.executable, tmp_path, ["attention"], False, gpu_check.Budget(None),
                                          stages)
    assert [env for _, env in calls] == [None, {"FUSED_ATTN_CUDA_BLOCK_ROWS": "64"}]
    assert "--backends" in calls[1][0]
    assert [r["impl"] for r in records] == ["eager", "torch", "torch-flash", "cuda", "triton",
                                            "cuda [FUSED_ATTN_CUDA_BLOCK_ROWS=64]", "triton [FUSED_ATTN_CUDA_BLOCK_ROWS=64]"]
    assert list(stages) == ["bench attention bfloat16 fwd",
                            "bench attention bfloat16 fwd --backends cuda FUSED_ATTN_CUDA_BLOCK_ROWS=64"]


def test_gpu_check_tests_resume_where_an_earlier_report_stopped(tmp_path, monkeypatch):
    """--resume: the tests an earlier report records as passed are deselected; the new report
    records its own passed ids (failed and skipped ones are not), the slowest tests and how many
    were left out."""
    from benchmarks import gpu_check

    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"tests": {"passed_ids": ["tests/test_a.py::test_x[cuda]", "tests/test_b.py::test_y"]}}))
    junit = """<?xml version="1.0"?><testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">
    <testcase classname="tests.test_c" name="test_z[p-cuda]" time="4.5"/>
    <testcase classname="tests.test_c" name="test_w" time="0.5"><failure message="boom"/></testcase>
    <testcase classname="tests.test_d" name="test_v" time="0.0"><skipped message="no"/></testcase>
    </testsuite></testsuites>"""
    commands = []

    environments = []

    def fake_run(cmd, timeout, env=None):
        commands.append(cmd)
        environments.append(env)
        Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]).write_text(junit)
        return 1, "1 failed"

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    summary = gpu_check.run_tests(sys.executable, tmp_path, 60, False, [earlier])
    (cmd,) = commands
    assert environments == [{"TRITON_INTERPRET": "0", "FUSED_ATTN_TRITON_AUTOTUNE": "0", "FUSED_ATTN_TEST_ORDER": "spread"}]
    files = [arg for arg in cmd if arg.startswith("tests/") and arg.endswith(".py")]
    assert files[:2] == ["tests/test_cuda_block_strips.py", "tests/test_attention.py"]  # the kernels' parity first
    assert sorted(files) == sorted(f"tests/{p.name}" for p in (Path(gpu_check.ROOT) / "tests").glob("test_*.py"))
    deselected = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--deselect"]
    assert deselected == ["tests/test_a.py::test_x[cuda]", "tests/test_b.py::test_y"]
    assert summary["passed_ids"] == ["tests/test_c.py::test_z[p-cuda]"]
    assert summary["failed_tests"] == [{"test": "tests/test_c.py::test_w", "message": "boom"}]
    assert summary["slowest"][0] == {"test": "tests/test_c.py::test_z[p-cuda]", "seconds": 4.5}
    assert summary["resumed"] == {"reports": ["earlier.json"], "not_rerun": 2}
    facts = {"gpu": "H200", "date": "today", "torch": "2", "torch_cuda": "13", "triton": "3", "fused_attn": "0"}
    md = gpu_check.render_markdown(facts, summary, [], {"skipped": "--skip-sanitizer"}, {}, {},
                                   stages={"tests": 61, "bench attention bfloat16 fwd": 100})
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in md
    assert "(resumed: 2 tests that passed in earlier.json were not run again)" in md
    assert "slowest: `tests/test_c.py::test_z[p-cuda]` 4.5 s" in md
    assert "Wall time per stage: tests 61 s, bench attention bfloat16 fwd 100 s" in md


def test_spread_order_tries_every_test_function_first_and_samples_each_grid():
    """FUSED_ATTN_TEST_ORDER=spread (make gpu-check's test run): round k takes the k-th case of every
    function in collection order, each function's cases in bit-reversed order of their index."""
    from .conftest import spread_order

    ids = [f"tests/test_a.py::test_f[{i}]" for i in range(8)] + ["tests/test_a.py::test_g"]
    ids += [f"tests/test_b.py::test_h[{i}-cuda]" for i in range(3)]
    order = [ids[i] for i in spread_order(ids)]
    assert sorted(order) == sorted(ids)
    assert order[:3] == ["tests/test_a.py::test_f[0]", "tests/test_a.py::test_g", "tests/test_b.py::test_h[0-cuda]"]
    assert [i for i in order if "test_f" in i] == [f"tests/test_a.py::test_f[{i}]" for i in (0, 4, 2, 6, 1, 5, 3, 7)]
    assert [i for i in order if "test_h" in i] == [f"tests/test_b.py::test_h[{i}-cuda]" for i in (0, 2, 1)]
    assert spread_order([]) == []


def test_spread_order_reorders_a_collection(tmp_path):
    """The collection hook applies it: a run of a parametrised file under FUSED_ATTN_TEST_ORDER=spread
    takes the functions' first cases first."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_f(i): pass\n"
        "def test_g(): pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "FUSED_ATTN_TEST_ORDER": "spread"})
    collected = [line.split("::", 1)[1] for line in run.stdout.splitlines() if "::" in line]
    assert collected == ["test_f[0]", "test_g", "test_f[2]", "test_f[1]", "test_f[3]"], run.stdout + run.stderr


def test_sanitizer_workload_runs_on_the_cpu_backend(capsys):
    """The compute-sanitizer script of make gpu-check, with its device and backend set to cpu, runs
    every case it holds (a misspelt argument would otherwise show only on the GPU, as a failed run)."""
    from benchmarks import gpu_check

    if not _extension.has_kernel("attention_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    head = 'DEVICE, BACKEND = "cuda", "cuda"'
    assert head in gpu_check.SANITIZER_SCRIPT
    exec(gpu_check.SANITIZER_SCRIPT.replace(head, 'DEVICE, BACKEND = "cpu", "cpu"'), {})
    assert "sanitizer workload done" in capsys.readouterr().out


@pytest.mark.parametrize("outputs, expected", [
    ({"memcheck": (0, "========= ERROR SUMMARY: 0 errors"), "racecheck": (1, "========= ERROR SUMMARY: 3 errors")},
     ["- memcheck: clean ERROR SUMMARY: 0 errors", "- racecheck: FAILED (exit code 1) ERROR SUMMARY: 3 errors"]),
    ({"memcheck": (1, "========= Error: Device not supported\n========= Target application returned an error")},
     ["skipped: compute-sanitizer refused the device: ========= Error: Device not supported"]),
    ({"memcheck": (0, "========= ERROR SUMMARY: 0 errors"), "racecheck": (255, "fatal: cannot start\n\n")},
     ["- memcheck: clean", "- racecheck: FAILED (exit code 255) fatal: cannot start"]),
])
def test_sanitizer_outcomes_in_the_report(outputs, expected, monkeypatch, tmp_path):
    """Each check's verdict reaches the report; a tool that refuses the device is a skip with its
    line (the other check is not tried), and a failure without a summary shows the tool's last line."""
    from benchmarks import gpu_check

    tool = tmp_path / "compute-sanitizer"
    tool.write_text("")
    calls = []

    def fake_run(cmd, timeout, env=None):
        calls.append(cmd[2])
        return outputs[cmd[2]]

    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: str(tool))
    monkeypatch.setattr(gpu_check, "_run", fake_run)
    result = gpu_check.run_sanitizer(sys.executable, gpu_check.Budget(None))
    assert calls == list(outputs)
    md = gpu_check.render_markdown({"gpu": "H200", "date": "today", "torch": "2", "torch_cuda": "13", "triton": "3",
                                    "fused_attn": "0"}, {"skipped_run": True, "failed_tests": []}, [], result, {}, {})
    for line in expected:
        assert line in md


def test_bench_survives_a_case_that_does_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    """Running out of memory setting a case up is a skipped record and the sweep goes on;
    an eager baseline that failed leaves speedup_vs_eager null (strict JSON), not NaN."""
    from fused_attn.bench import cli as bench_cli
    from fused_attn.bench.suites import SUITES

    def layer_norm_cases(settings):
        yield from real(settings)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    real = SUITES["layer_norm"]
    monkeypatch.setitem(SUITES, "layer_norm", layer_norm_cases)
    real_run_case = bench_cli.run_case

    def run_case(case, *args, **kwargs):
        case.impls["torch"] = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(bench_cli, "run_case", run_case)
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "all", "--device", "cpu", "--rows", "8", "--hidden", "16",
                           "--seq", "16", "--repeats", "1", "--no-compile", "--json", str(out)], capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    skipped = [r for r in records if r["suite"] == "layer_norm" and r["impl"] == "all"]
    assert len(skipped) == 1 and "ran out of memory" in skipped[0]["skipped"]
    assert {"softmax", "ffn", "attention"} <= {r["suite"] for r in records if r["skipped"] is None}
    timed = [r for r in records if r["skipped"] is None and r["baseline"] == "torch"]
    assert timed and all(r["speedup_vs_eager"] is None for r in timed)


def test_bench_plot_without_timed_records_writes_nothing(tmp_path, capsys, monkeypatch):
    from fused_attn.bench import cli as bench_cli

    def run_case(case, device, *args, **kwargs):
        return [bench_cli.record(case.suite, "x", device, case.dtype, case.mode, case.shape, skipped="-")]

    monkeypatch.setattr(bench_cli, "run_case", run_case)
    png = tmp_path / "p.png"
    code, captured = _run(["bench", "--suite", "layer_norm", "--device", "cpu", "--rows", "8", "--hidden", "16",
                           "--repeats", "1", "--plot", str(png)], capsys)
    assert "no timed records to plot" in captured.out and not png.exists()
    # Nothing ran at all: a failure, said in one line after the outputs.
    assert code == 1 and captured.err.strip() == ('fused-attn bench: error: no implementation ran; the reasons are '
                                                  'under "not run" above')


@pytest.mark.parametrize("command", ["bench", "profile-memory"])
def test_bert_mini_takes_a_layer_count(command, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--device", "cpu", "--batch", "1", "--seq", "8", "--layers", "1", "--json", str(out)]
    if command == "bench":
        args = ["bench", "--suite", "model", "--models", "bert-mini", "--repeats", "1", "--no-compile", *args]
    else:
        args = ["profile-memory", "--model", "bert-mini", "--mode", "fwd", *args]
    code, captured = _run(args, capsys)
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    layers = result[0]["shape"]["layers"] if command == "bench" else result["layers"]
    assert layers == 1


# ---------------------------------------------------------------------------------------------
# What each case times


def _settings(mode: str, **sizes) -> Settings:
    return Settings(device=CPU, dtype=torch.float32, mode=mode, backends=["cpu"], compile=False, **sizes)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "grouped"])
def test_attention_baseline_is_the_plain_eager_form(causal, kv_heads):
    """The speed-ups are against softmax(QK^T*scale)V as a user writes it; the reference oracle
    (slower: its guard for fully masked rows) is a row of its own. With --kv-heads (grouped-query)
    every implementation computes the same attention, key/value read for both query heads."""
    settings = _settings("fwd", batch=1, heads=2, kv_heads=kv_heads, head_dim=8, seqs=[8], causal=[causal])
    case = next(suites.attention_cases(settings))
    assert case.baseline == "eager" and {"eager", "reference", "torch"} <= set(case.impls)
    assert case.shape.get("kv_heads") == kv_heads
    expected = case.impls["eager"]()
    for name in ("torch", "reference", "cpu"):
        if name in case.impls:
            torch.testing.assert_close(case.impls[name](), expected, msg=name)


def test_attention_with_fewer_queries_than_keys():
    """--queries: that many queries per sequence against its --seq keys (a decoding step against a
    cache): every implementation computes the same attention, the rates count Lq x Lk pairs, and
    causality is off by default."""
    settings = _settings("fwd", batch=2, heads=2, head_dim=8, seqs=[40], queries=3)
    cases = list(suites.attention_cases(settings))
    assert [case.shape["causal"] for case in cases] == [False]
    case = cases[0]
    assert case.shape["queries"] == 3 and case.shape["seq"] == 40
    assert case.flops == harness.attention_flops(2, 2, 3, 40, 8, causal=False, mode="fwd")
    expected = case.impls["eager"]()
    assert expected.shape == (2, 2, 3, 8)
    for name in ("torch", "reference", "cpu"):
        torch.testing.assert_close(case.impls[name](), expected, msg=name)
    assert bench_cli.shape_text(case.shape).startswith("B2 H2 Lq3 L40")


@pytest.mark.parametrize("causal, expected", [(None, [False]), ("both", [False, True]), ("true", [True])])
def test_attention_queries_take_causal_as_asked(causal, expected):
    """--queries: causality is off unless --causal asks for it (both: a causal case too, top-left
    aligned as everywhere); there, PyTorch's FlashAttention backend (which refuses is_causal for
    fewer queries than keys) is listed as not run."""
    flags = ["--suite", "attention", "--device", "cpu", "--queries", "2", "--seq", "6", "--heads", "2",
             "--head-dim", "8", "--batch", "1"] + (["--causal", causal] if causal else [])
    ((suite, settings),) = bench_cli._plan(_parse(*flags), CPU)
    settings = dataclasses.replace(settings, backends=["cpu"], compile=False)
    cases = list(suites.attention_cases(settings))
    assert [case.shape["causal"] for case in cases] == expected
    for case in cases:
        expected_out = case.impls["eager"]()
        for name in ("torch", "reference", "cpu"):
            torch.testing.assert_close(case.impls[name](), expected_out, msg=name)
        if case.shape["causal"]:
            assert "torch-flash" not in case.impls


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_padding_computes_the_same_attention_everywhere(causal):
    """--padding: every implementation gets the same [B, 1, 1, L] key padding mask (torch's SDPA the
    mask and causality combined, as it takes no mask with is_causal); the eager form is the check,
    and differs from the unpadded case's. Kernels whose calls here take no mask are skipped."""
    cases = []
    for padding in (0.3, None):
        torch.manual_seed(0)
        settings = _settings("fwd", batch=2, heads=2, head_dim=8, seqs=[10], causal=[causal], padding=padding)
        cases.append(next(suites.attention_cases(settings)))
    padded, full = cases
    assert padded.shape["padding"] == 0.3 and "padding" not in full.shape
    assert padded.skipped["torch-flash"] == "PyTorch's FlashAttention backend takes no mask"
    expected = padded.impls["eager"]()
    assert not torch.allclose(expected, full.impls["eager"]())
    for name in ("torch", "reference", "cpu"):
        if name in padded.impls:
            torch.testing.assert_close(padded.impls[name](), expected, msg=name)
    training = next(suites.attention_cases(_settings("fwd+bwd", batch=2, heads=2, head_dim=8, seqs=[10],
                                                     causal=[causal], padding=0.3)))
    for name in ("eager", "torch", "cpu"):
        training.impls[name]()  # the backward runs through the mask


@pytest.mark.parametrize("activation", [None, "gelu-tanh", "relu"])
def test_ffn_with_an_activation_computes_that_ffn_everywhere(activation):
    """--activation: every implementation of the FFN suite applies that activation between the GEMMs
    (torch's function in the eager baseline); the shape names it unless it is the default GELU, and
    apex, which has a GELU only, is skipped for ReLU."""
    def build(name):
        torch.manual_seed(0)  # the same input and weights for every activation
        return next(suites.ffn_cases(_settings("fwd", rows=6, hiddens=[8], activation=name)))

    case = build(activation)
    assert case.shape.get("activation") == activation
    x = torch.randn(6, 8)
    (_, approximate), act = suites.FFN_ACTIVATIONS[activation or "gelu"]
    assert act(x).equal(F.relu(x) if activation == "relu" else F.gelu(x, approximate=approximate))
    expected = case.impls["torch"]()
    for name in ("reference", "cpu"):
        torch.testing.assert_close(case.impls[name](), expected, msg=name)
    others = [build(other) for other in ("gelu", "gelu-tanh", "relu") if other != (activation or "gelu")]
    assert all(not torch.allclose(other.impls["torch"](), expected) for other in others)
    if activation == "relu":
        assert case.skipped["apex"] == "apex's fused dense has a GELU only"
    with pytest.raises(ValueError, match="activation must be one of gelu, gelu-tanh, relu, got 'swish'"):
        suites.ffn_shapes(_settings("fwd", activation="swish"))


def test_bench_ffn_activation_flag(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "ffn", "--device", "cpu", "--repeats", "1", "--no-compile",
                           "--rows", "8", "--hidden", "24", "--activation", "relu", "--json", str(out)], capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text())
    assert {r["impl"] for r in records if r["skipped"] is None} >= {"torch", "reference", "cpu"}
    assert all(r["shape"] == {"tokens": 8, "d_model": 24, "d_ff": 96, "activation": "relu"} for r in records)
    assert "T8 M24 F96 relu" in captured.out
    code, captured = _run(["bench", "--suite", "softmax", "--device", "cpu", "--repeats", "1", "--batch", "1",
                           "--heads", "1", "--seq", "8", "--activation", "relu"], capsys)
    assert code == 0 and "--activation" in captured.out + captured.err


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_with_dropout_drops_in_every_implementation(mode):
    """--dropout: every implementation drops the probabilities at that rate, scaled by 1 / (1 - p):
    its output differs from the undropped one, and its projection on it is about the undropped
    output's own (unscaled, it would be half as large at p = 0.5)."""
    cases = []
    for dropout in (0.5, None):
        torch.manual_seed(0)
        cases.append(next(suites.attention_cases(_settings(mode, batch=2, heads=2, head_dim=16, seqs=[64],
                                                           causal=[False], dropout=dropout))))
    dropped, full = cases
    assert dropped.shape["dropout"] == 0.5 and "dropout" not in full.shape
    assert bench_cli.shape_text(dropped.shape) == "B2 H2 L64 D16 full dropout 0.5"
    expected = full.impls["eager"]()
    names = [name for name in ("eager", "torch", "reference", "cpu") if name in dropped.impls]
    assert {"eager", "torch", "reference"} <= set(names)
    for name in names:
        out = dropped.impls[name]()
        if mode == "fwd+bwd":
            continue  # a training call returns its gradients; that it runs is the check
        assert not torch.allclose(out, expected), name
        ratio = float((out * expected).sum() / (expected * expected).sum())
        assert 0.85 < ratio < 1.15, (name, ratio)


def test_fwd_bwd_calls_do_not_accumulate_into_grad():
    """Every timed forward + backward call does the same work as the first: accumulating into the
    inputs' .grad would add an in-place add of every gradient from the second call on."""
    from torch.profiler import profile

    case = next(suites.layer_norm_cases(_settings("fwd+bwd", rows=8, hiddens=[16])))
    for name in ("torch", "cpu"):
        ops = []
        for _ in range(2):
            with profile() as prof:
                case.impls[name]()
            ops.append(sorted(e.name for e in prof.events() if e.name.startswith("aten::")))
        assert ops[0] == ops[1], name
        assert "aten::add_" not in ops[1], name


@pytest.mark.parametrize("suite, op, sizes", [
    ("layer_norm", "layer_norm", {"rows": 8, "hiddens": [16]}),
    ("add_layer_norm", "add_layer_norm", {"rows": 8, "hiddens": [16]}),
    ("softmax", "softmax", {"batch": 1, "heads": 2, "seqs": [8]}),
    ("ffn", "ffn", {"rows": 8, "hiddens": [16]}),
    ("attention", "scaled_dot_product_attention", {"batch": 1, "heads": 2, "head_dim": 8, "seqs": [8]}),
])
def test_the_backend_auto_picks_is_timed_as_a_users_call(suite, op, sizes):
    """The fused backend the policy picks is called with no backend named, as a user calls the op,
    so the plain call's C++ entry serves it (its host time is what a user gets); a backend named
    on purpose takes the Python path."""
    if backends.fast_entry(op) is None:
        pytest.skip("fused_attn._C is not loaded, or has no C++ entry")
    case = next(suites.SUITES[suite](_settings("fwd", **sizes)))
    before = backends._FAST.served()[op]
    case.impls["cpu"]()
    assert backends._FAST.served()[op] == before + 1
    assert fused_attn.last_backend(op) == "cpu"


def test_third_party_attention_runs_forward_and_backward(monkeypatch):
    """flash-attn and xformers take and return [B, L, H, D]; the output comes back as a
    [B, H, L, D] view, so the case's gradient fits it (heads != seq, so a mix-up shows)."""
    from fused_attn.bench import cli as bench_cli
    from fused_attn.bench import third_party

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2).contiguous()

    missing = third_party._missing
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(third_party, "_missing", lambda module, package: None if module == "flash_attn"
                        else missing(module, package))
    monkeypatch.setattr(third_party, "_gpu_half", lambda x, library: None)
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    out = dict(third_party.attention(q, k, v, True))["flash-attn"]()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    case = next(suites.attention_cases(_settings("fwd+bwd", batch=1, heads=2, head_dim=4, seqs=[8], causal=[True])))
    records = {r["impl"]: r for r in bench_cli.run_case(case, CPU, repeats=1)}
    assert records["flash-attn"]["skipped"] is None, records["flash-attn"]
    assert records["flash-attn"]["median_ms"] > 0


def test_implementations_that_cannot_run_leave_a_reason(monkeypatch):
    from fused_attn.bench import workloads

    case = next(suites.attention_cases(_settings("fwd", batch=1, heads=1, head_dim=8, seqs=[8], causal=[False])))
    assert "torch-flash" not in case.impls and "CUDA only" in case.skipped["torch-flash"]
    case = next(suites.ffn_cases(_settings("fwd+bwd", rows=4, hiddens=[8])))
    assert "apex" not in case.impls and "inference only" in case.skipped["apex"]

    def unavailable(name, **kwargs):
        raise workloads.WorkloadUnavailable(f"{name} needs transformers")

    monkeypatch.setattr(workloads, "build", unavailable)
    for compile, impls in ((True, {"plain", "optimized", "compiled"}), (False, {"plain", "optimized"})):
        settings = dataclasses.replace(_settings("fwd", models=["hf-bert"], batch=1, seqs=[8]), compile=compile)
        case = next(suites.model_cases(settings))
        assert not case.impls and case.skipped == dict.fromkeys(impls, "hf-bert needs transformers")


def _parse(*args: str):
    return cli.build_parser().parse_args(["bench", *args])


@pytest.mark.parametrize("mode, plan", [
    (None, [("model", "fwd"), ("model", "fwd+bwd"), ("attention", "fwd+bwd")]),
    ("fwd", [("model", "fwd"), ("attention", "fwd")]),
    ("fwd+bwd", [("model", "fwd+bwd"), ("attention", "fwd+bwd")]),
    ("both", [("model", "fwd"), ("model", "fwd+bwd"), ("attention", "fwd"), ("attention", "fwd+bwd")]),
])
def test_default_cpu_run_follows_mode(mode, plan):
    from fused_attn.bench import cli as bench_cli

    args = _parse("--device", "cpu", *(["--mode", mode] if mode else []))
    assert [(suite, s.mode) for suite, s in bench_cli._plan(args, CPU)] == plan


def test_default_cpu_run_says_compiled_is_left_out(tmp_path, capsys):
    out = tmp_path / "d.json"
    code, captured = _run(["bench", "--device", "cpu", "--mode", "fwd", "--models", "bert-tiny", "--layers", "1",
                           "--batch", "1", "--seq", "8", "--heads", "1", "--head-dim", "8", "--backends", "cpu",
                           "--repeats", "1", "--json", str(out)], capsys)
    assert code == 0, captured.err
    records = json.loads(out.read_text())
    assert {(r["suite"], r["mode"]) for r in records} == {("model", "fwd"), ("attention", "fwd")}
    compiled = {r["suite"]: r["skipped"] for r in records if r["impl"] == "compiled"}
    assert set(compiled) == {"model", "attention"}
    assert all("left out of the default CPU run" in why for why in compiled.values())
    assert "`fused-attn bench --suite attention`" in compiled["attention"]
    from fused_attn.bench import cli as bench_cli

    no_compile = bench_cli._plan(_parse("--device", "cpu", "--no-compile"), CPU)
    assert all(s.compile_skipped is None and not s.compile for _, s in no_compile)


@pytest.mark.parametrize("args, notes", [
    (["--suite", "layer_norm", "--seq", "5", "--batch", "2", "--causal", "true", "--rows", "8", "--layers", "2"],
     [f"note: {flag} has no effect on suite layer_norm (it takes --rows, --hidden and --backends)"
      for flag in ("--batch", "--seq", "--causal", "--layers")]),
    (["--suite", "attention", "--hidden", "16", "--rows", "8", "--seq", "8", "--causal", "false"],
     [f"note: {flag} has no effect on suite attention (it takes --batch, --heads, --kv-heads, --queries, --head-dim, --seq, "
      "--causal, --padding, --dropout and --backends)" for flag in ("--rows", "--hidden")]),
    (["--suite", "model", "--backends", "cpu", "--heads", "2", "--head-dim", "8", "--hidden", "16", "--seq", "8"],
     [f"note: {flag} has no effect on suite model (it takes --models, --layers, --batch, --seq and --padding)"
      for flag in ("--heads", "--head-dim", "--backends", "--hidden")]),
    (["--suite", "softmax", "--models", "bert-tiny", "--head-dim", "8", "--kv-heads", "5"],
     [f"note: {flag} has no effect on suite softmax (it takes --batch, --heads, --seq and --backends)"
      for flag in ("--kv-heads", "--head-dim", "--models")]),
    (["--rows", "8"], ["note: --rows has no effect on suites model, attention (none of them takes it)"]),
    (["--suite", "all", "--seq", "8", "--rows", "8", "--models", "bert-tiny", "--causal", "true"], []),
    (["--suite", "ffn"], []),
])
def test_flags_a_suite_does_not_take_are_noted(args, notes, capsys, monkeypatch):
    from fused_attn.bench import cli as bench_cli

    ran = []

    def run_suite(suite, settings, device, repeats, progress, records, *args):
        ran.append(suite)
        records.append(bench_cli.record(suite, "torch", device, settings.dtype, settings.mode, {}, median_ms=1.0,
                                        min_ms=1.0, max_ms=1.0))

    monkeypatch.setattr(bench_cli, "_run_suite", run_suite)
    code, captured = _run(["bench", "--device", "cpu", *args], capsys)
    assert code == 0 and ran
    assert [line for line in captured.out.splitlines() if "has no effect" in line] == notes


TINY = ["bench", "--suite", "layer_norm", "--device", "cpu", "--rows", "8", "--hidden", "8", "--repeats", "1",
        "--no-compile"]


@pytest.mark.parametrize("args, message", [
    ([*TINY, "--backends", "reference"], "'reference' is not a fused backend"),
    ([*TINY, "--backends", ","], "expected a comma-separated list without empty items, got ','"),
    ([*TINY, "--backends", "cpu,"], "expected a comma-separated list without empty items, got 'cpu,'"),
    ([*TINY, "--hidden", "8,,16"], "expected comma-separated positive integers, got '8,,16'"),
    ([*TINY, "--json", ""], "--json: empty file name"),
    ([*TINY, "--csv", ""], "--csv: empty file name"),
    ([*TINY, "--plot", " "], "--plot: empty file name"),
    ([*TINY, "--rows", "100000000000000000000"], "up to 2**31 - 1 (2147483647), got 100000000000000000000"),
    ([*TINY, "--rows", "9223372036854775807"], "up to 2**31 - 1"),
    (["bench", "--batch", "2147483648"], "up to 2**31 - 1"),
    (["profile-memory", "--batch", "100000000000000000000"], "up to 2**31 - 1"),
    (["profile-memory", "--model", "bert-tiny", "--device", "cpu", "--json", ""], "--json: empty file name"),
])
def test_bad_lists_paths_and_sizes_one_line_error(args, message, capsys):
    test_bad_arguments_one_line_error(args, message, capsys)


def test_a_case_whose_sizes_overflow_is_a_skipped_record(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "softmax", "--device", "cpu", "--batch", "1", "--heads", "1", "--seq",
                           "2147483647", "--repeats", "1", "--no-compile", "--backends", "cpu", "--json", str(out)],
                          capsys)
    # The one record: the case that could not be set up, with the shape it tried and every key
    # of a timed record, null. Nothing ran, which is a failure (exit status 1).
    assert code == 1 and "no implementation ran" in captured.err
    (record,) = json.loads(out.read_text())
    assert record["impl"] == "all" and "sizes are too large to set up" in record["skipped"]
    assert "overflow" in record["skipped"]
    assert record["shape"] == {"batch": 1, "heads": 1, "seq": 2147483647}
    assert set(record) == RECORD_KEYS | {"gbps"} and all(record[key] is None for key in (*TIMING_KEYS, "gbps"))


@pytest.mark.parametrize("command", ["bench", "profile-memory"])
def test_plot_without_matplotlib_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    from fused_attn.bench import cli as bench_cli
    from fused_attn.bench import workloads

    def work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench_cli, "_run_suite", work)
    monkeypatch.setattr(workloads, "build", work)
    args = TINY if command == "bench" else ["profile-memory", "--model", "bert-tiny", "--device", "cpu"]
    code, captured = _run([*args, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "--plot needs matplotlib" in captured.err
    assert not (tmp_path / "p.png").exists()


def test_gpu_check_suites_must_be_known():
    import argparse

    from benchmarks import gpu_check

    assert gpu_check.parse_suites("all") == sorted(suites.SUITES)
    assert gpu_check.parse_suites("attention,ffn") == ["attention", "ffn"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown suite 'atention'; expected all or some of "
                       "add_layer_norm, attention, ffn, layer_norm, model, softmax"):
        gpu_check.parse_suites("atention,layernorm")


def test_profile_memory_sizes_that_overflow_are_a_usage_error(capsys, monkeypatch):
    from fused_attn.bench import workloads

    def build(*args, **kwargs):
        raise RuntimeError("Storage size calculation overflowed with sizes=[2147483647, 2147483647]")

    monkeypatch.setattr(workloads, "build", build)
    code, captured = _run(["profile-memory", "--model", "bert-tiny", "--device", "cpu"], capsys)
    assert code == 2 and "sizes too large to set up: RuntimeError: Storage size" in captured.err


# ---------------------------------------------------------------------------------------------
# What the output says about the figures


def test_a_stale_extension_is_noted_and_recorded(tmp_path, capsys, monkeypatch):
    from fused_attn import _extension

    monkeypatch.setattr(_extension, "stale_reason", lambda: "the sources changed since it was built")
    out = tmp_path / "r.json"
    code, captured = _run([*TINY, "--backends", "cpu", "--json", str(out)], capsys)
    assert code == 0, captured.err
    first = captured.out.splitlines()[0]
    assert first.startswith("note: the compiled extension should be rebuilt (the sources changed since it was built)")
    assert {r["extension_stale"] for r in json.loads(out.read_text())} == {"the sources changed since it was built"}


def test_triton_under_the_interpreter_is_marked(tmp_path, capsys):
    from fused_attn import backends

    why = backends.backend_unavailable_reasons("triton", CPU)
    if why:
        pytest.skip("; ".join(why))
    out = tmp_path / "r.json"
    code, captured = _run(["bench", "--suite", "attention", "--device", "cpu", "--batch", "1", "--heads", "1",
                           "--head-dim", "16", "--seq", "16", "--causal", "false", "--backends", "triton",
                           "--repeats", "1", "--no-compile", "--json", str(out)], capsys)
    assert code == 0, captured.err
    records = {r["impl"]: r for r in json.loads(out.read_text()) if r["skipped"] is None}
    assert records["triton"]["interpreted"] is True and records["triton"]["speedup_vs_eager"] > 0
    assert not any(r["interpreted"] for name, r in records.items() if name != "triton")
    (row,) = [line for line in captured.out.splitlines() if line.startswith("attention") and " triton*" in line]
    assert "FLOP/s)" in row and "x)" in row  # rate and speed-ups in parentheses
    from fused_attn.bench import cli as bench_cli

    assert bench_cli.INTERPRETED_NOTE in captured.out
    # Not named: not timed (interpreted calls at a default run's sizes take minutes), said why.
    code, captured = _run(["bench", "--suite", "layer_norm", "--device", "cpu", "--rows", "8", "--hidden", "16",
                           "--repeats", "1", "--no-compile", "--json", str(out)], capsys)
    assert code == 0, captured.err
    (triton,) = [r for r in json.loads(out.read_text()) if r["impl"] == "triton"]
    assert "name it in --backends to time it anyway" in triton["skipped"]


def _timed_record(impl: str, min_ms: float, max_ms: float) -> dict:
    from fused_attn.bench import cli as bench_cli

    return bench_cli.record("layer_norm", impl, CPU, torch.float32, "fwd", {"rows": 8, "hidden": 16},
                            median_ms=max_ms / 2, min_ms=min_ms, max_ms=max_ms, gbps=1.0, speedup_vs_eager=1.0)


def test_noisy_rows_are_noted_under_the_table():
    from fused_attn.bench import cli as bench_cli

    table = bench_cli.format_table([_timed_record("torch", 1.0, 2.0), _timed_record("cpu", 0.1, 35.0)])
    (note,) = [line for line in table.splitlines() if "noisy" in line]
    assert note.startswith("note: 1 row(s) have noisy timings, max/min over 3x: layer_norm rows 8 N16 fwd cpu (350x)")
    assert "more --repeats" in note
    assert "noisy" not in bench_cli.format_table([_timed_record("torch", 1.0, 2.9)])


def test_a_busy_machine_is_noted(monkeypatch):
    from fused_attn.bench import cli as bench_cli

    threads = torch.get_num_threads()
    monkeypatch.setattr(bench_cli.os, "getloadavg", lambda: (threads + 0.5, 0.0, 0.0))
    assert bench_cli.load_notes() == []  # this run's own threads
    monkeypatch.setattr(bench_cli.os, "getloadavg", lambda: (threads + 4.2, 0.0, 0.0))
    (note,) = bench_cli.load_notes()
    assert note.startswith(f"note: other work shared the machine (load average {threads + 4.2:.1f} on ")


@pytest.mark.parametrize("flags, device, sampling", [
    ([], "cpu", (5, 0.25, None)),
    (["--repeats", "2"], "cpu", (2, 0.25, None)),  # --repeats sets the least number; --min-time still applies
    (["--repeats", "2", "--min-time", "0"], "cpu", (2, 0.0, None)),  # exactly --repeats
    (["--min-time", "1"], "cpu", (5, 1.0, None)),
    ([], "cuda", (30, 0.0, 2.0)),
    (["--max-time", "0"], "cuda", (30, 0.0, None)),  # every repeat, however slow
    (["--max-time", "0.5"], "cpu", (5, 0.25, 0.5)),
])
def test_repeats_is_the_least_number_of_calls_and_min_time_still_applies(flags, device, sampling):
    from fused_attn.bench import cli as bench_cli

    assert bench_cli.sampling(_parse(*flags), torch.device(device)) == sampling


def test_max_time_stops_a_slow_implementation_at_five_calls():
    """A slow implementation stops at CAPPED_REPEATS calls once they add up past max_time_s; a fast
    one beside it keeps every repeat, and without the cap the slow one does too."""
    import time as time_module

    from fused_attn.bench import harness

    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time_module.sleep(0.02)

    def fast():
        calls["fast"] += 1

    def timed_calls(**kwargs):
        calls.update(slow=0, fast=0)
        harness.measure_side_by_side({"slow": slow, "fast": fast}, torch.device("cpu"), repeats=12, warmup=1,
                                     **kwargs)
        return calls["slow"] - 2, calls["fast"] - 2  # less the warm-up and the peak-memory call

    assert timed_calls(max_time_s=0.05) == (harness.CAPPED_REPEATS, 12)
    assert timed_calls(max_time_s=10.0) == (12, 12)
    assert timed_calls() == (12, 12)


def test_rates_print_in_readable_units():
    from fused_attn.bench import cli as bench_cli

    assert bench_cli.rate_text({"tflops": 0.0205}) == "20.5 GFLOP/s"
    assert bench_cli.rate_text({"tflops": 2.62e-05}) == "26.2 MFLOP/s"
    assert bench_cli.rate_text({"tflops": 989.0}) == "989 TFLOP/s"
    assert bench_cli.rate_text({"gbps": 0.52, "tflops": None}) == "520 MB/s"
    assert bench_cli.rate_text({"tokens_per_s": 5791.3}) == "5,791 tok/s"
    assert bench_cli.rate_text({"gbps": None}) == "-"


def test_progress_counts_cases_and_follows_the_timed_rounds(capsys, monkeypatch):
    seen = {}

    class Bar:
        def __init__(self, total):
            seen.update(total=total, starts=[], shows=[])

        def start(self, label):
            seen["starts"].append(label)

        def show(self, label):
            seen["shows"].append(label)

    import contextlib

    @contextlib.contextmanager
    def progress(description, total=None, **kwargs):
        yield Bar(total)

    monkeypatch.setattr(harness, "progress", progress)
    code, captured = _run([*TINY, "--hidden", "8,16", "--repeats", "2", "--backends", "cpu"], capsys)
    assert code == 0, captured.err
    assert seen["total"] == 2 and seen["starts"] == ["layer_norm fwd rows 8 N8", "layer_norm fwd rows 8 N16"]
    assert {"warm-up torch", "timed round 1", "timed round 2", "peak memory cpu"} <= set(seen["shows"])


def test_progress_bar_shows_a_total_on_stderr(capsys):
    with harness.progress("bench", 2, unit="case", enabled=True) as bar:
        bar.start("first")
        bar.show("timed round 3")
        bar.start("second")
    err = capsys.readouterr().err
    assert "0/2 [" in err and "first: timed round 3]" in err and "1/2 [" in err and "second]" in err


@pytest.mark.parametrize("args, message", [
    ([*TINY, "--json", "same.out", "--csv", "same.out"], "--json and --csv name the same file, same.out"),
    ([*TINY, "--csv", "r.png", "--plot", "./r.png"], "--csv and --plot name the same file, ./r.png"),
    (["profile-memory", "--model", "bert-tiny", "--device", "cpu", "--json", "m.png", "--plot", "m.png"],
     "--json and --plot name the same file, m.png"),
])
def test_two_outputs_naming_one_file_is_a_usage_error(args, message, capsys):
    test_bad_arguments_one_line_error(args, message, capsys)


# ---------------------------------------------------------------------------------------------
# Workloads too large for the memory here


def test_a_model_workload_larger_than_memory_is_refused_before_it_is_built(capsys, monkeypatch):
    from fused_attn.bench import workloads

    def build(*args, **kwargs):
        raise AssertionError("the workload was built")

    monkeypatch.setattr(workloads, "_padding_mask", build)  # the first allocation
    code, captured = _run(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--batch", "1000", "--seq",
                           "1000000", "--device", "cpu"], capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("fused-attn profile-memory: error: bert-tiny at batch 1000, seq 1000000 needs at least ")
    assert "inputs 14.9 GiB" in lines[0] and "available on cpu" in lines[0]
    # The model suite of bench builds the same workloads: refused before any work too.
    monkeypatch.setattr(harness, "available_bytes", lambda device: 2**20)
    code, captured = _run(["bench", "--suite", "model", "--models", "bert-tiny", "--batch", "64", "--seq", "64",
                           "--device", "cpu", "--repeats", "1", "--no-compile"], capsys)
    assert code == 2 and "bert-tiny at batch 64, seq 64 needs at least" in captured.err
    assert "more than the 1.0 MiB available on cpu" in captured.err


def test_the_workload_estimate_is_a_lower_bound():
    """Inputs exactly, parameters as counted, activations under what a real forward holds."""
    from fused_attn.bench import workloads

    w = workloads.build("bert-tiny", batch=2, seq=64, layers=2, device=CPU, dtype=torch.float32, training=True)
    estimate = workloads.estimate_bytes("bert-tiny", batch=2, seq=64, layers=2, dtype=torch.float32, training=True)
    assert estimate["inputs"] == 2 * (2 * 64 * 8)  # int64 ids and mask
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    buffers = sum(b.numel() * 4 for b in w.model.buffers())
    assert estimate["parameters"] == 3 * params + 2 * buffers  # two models and one model's gradients
    profile = memory.profile_model(w.model.train(), w.step, CPU, training=True)
    assert 0 < estimate["activations"] <= profile.forward_peak_bytes


@pytest.mark.parametrize("padding, kept", [(None, [16, 14, 16]), (0.0, [16, 16, 16]), (0.5, [8, 8, 8]),
                                           (0.99, [1, 1, 1])])
def test_model_suite_padding(padding, kept, monkeypatch):
    """--padding for the model suite: every sequence's last fraction is padding (one token kept at
    least); without it the last eighth of every other sequence. The case's shape says it."""
    from fused_attn.bench import workloads

    masks = []
    real = workloads._padding_mask
    monkeypatch.setattr(workloads, "_padding_mask", lambda *a: masks.append(real(*a)) or masks[-1])
    settings = _settings("fwd", models=["bert-tiny"], batch=3, seqs=[16], layers=1, padding=padding)
    case = next(suites.model_cases(settings))
    assert case.shape.get("padding") == padding
    assert masks[0].sum(1).tolist() == kept
    case.impls["optimized"]()


@pytest.mark.parametrize("name", ["transformer", "nn-transformer"])
def test_transformer_layers_are_per_stack(name):
    from fused_attn.bench import workloads

    w = workloads.build(name, batch=1, seq=4, layers=1, device=CPU, dtype=torch.float32)
    assert w.layers == 1 and len(w.model.encoder.layers) == len(w.model.decoder.layers) == 1


def test_hf_gpt2_workload_is_gpt2_small_and_its_optimized_copy_fuses_its_mlp():
    """hf-gpt2: GPT-2 small's width and heads with the layers asked for, a padded batch, its size
    estimate counted on the model itself; optimized, its attention is the fused one and its MLPs
    run fused_attn.ffn, with the plain model's output."""
    pytest.importorskip("transformers")
    from fused_attn.bench import workloads

    w = workloads.build("hf-gpt2", batch=2, seq=16, layers=1, device=CPU, dtype=torch.float32)
    assert (w.model.config.n_embd, w.model.config.n_head, w.layers, len(w.model.h)) == (768, 12, 1, 1)
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    estimate = workloads.estimate_bytes("hf-gpt2", batch=2, seq=16, layers=1, dtype=torch.float32, training=False)
    assert estimate["parameters"] == 2 * params + 2 * sum(b.numel() * 4 for b in w.model.buffers())
    w.model.eval()
    fused = workloads.optimized(w)
    assert type(fused.h[0].mlp).__name__ == "FusedGPT2MLP"
    with torch.no_grad():
        torch.testing.assert_close(w.step(fused), w.step(w.model))
    assert fused_attn.last_backend("ffn") == "cpu"


def test_nn_transformer_workload_runs_its_decoder_causally(monkeypatch):
    """torch.nn.Transformer fed the causal mask as generate_square_subsequent_mask makes it, with
    padding: optimized, its decoder's self-attention reaches the kernels as is_causal with the
    [B, 1, 1, L] padding mask (the mask recognised as causal), and the step's output is the plain
    model's."""
    from fused_attn.bench import workloads
    from fused_attn.nn import attention as mha_module

    w = workloads.build("nn-transformer", batch=2, seq=16, layers=1, device=CPU, dtype=torch.float32)
    w.model.eval()
    fused = workloads.optimized(w)
    calls = []
    op = mha_module.scaled_dot_product_attention
    monkeypatch.setattr(mha_module, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append((tuple(a[3].shape), a[5])) or op(*a, **k))
    with torch.no_grad():
        want, got = w.step(w.model), w.step(fused)
    assert calls == [((2, 1, 1, 16), False), ((2, 1, 1, 16), True), ((2, 1, 1, 16), False)]  # enc, self, cross
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# profile-memory: what the step's peak hides


def test_memory_meter_peak_until_a_marker():
    with harness.MemoryMeter(CPU) as meter:
        a = torch.empty(1 << 18)  # 1 MiB
        b = torch.empty(1 << 19)  # 2 MiB
        del a, b
        meter.mark("forward")
        c = torch.empty(1 << 20)  # 4 MiB
        meter.mark("later")
        del c
    assert meter.peak_until("forward") == 3 << 20 and meter.at("forward") == 0
    assert meter.peak_until("later") == meter.peak_bytes == 4 << 20


def test_profile_memory_reports_the_forward_peak_and_saved_bytes(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, captured = _run(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--batch", "2", "--seq", "32",
                           "--device", "cpu", "--json", str(out)], capsys)
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    for side in ("plain", "fused"):
        profile = result[side]
        model_row = next(m for m in profile["modules"] if m["name"] == "(model)")
        assert profile["saved_bytes"] == model_row["saved_bytes"] > 0
        assert 0 < profile["forward_peak_bytes"] <= profile["peak_bytes"]
    assert result["forward_ratio"] == pytest.approx(result["fused"]["forward_peak_bytes"]
                                                    / result["plain"]["forward_peak_bytes"])
    assert result["saved_ratio"] == pytest.approx(result["fused"]["saved_bytes"] / result["plain"]["saved_bytes"])
    lines = captured.out.splitlines()
    assert any(line.startswith("peak of the step: plain ") for line in lines)
    assert any(line.startswith("forward peak: plain ") and "fused/plain" in line for line in lines)
    assert any(line.startswith("saved for backward: plain ") for line in lines)


# ---------------------------------------------------------------------------------------------
# Help


def _help(*args: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*args, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_bench_help_names_the_choices_and_defaults(capsys):
    from fused_attn import backends
    from fused_attn.bench import workloads

    text = _help("bench", capsys=capsys)
    assert "``" not in text
    assert f"of {', '.join(workloads.MODELS)}" in text
    assert f"of {', '.join(sorted(b for b in backends.BACKENDS if b != 'reference'))}" in text
    assert "heads (default 12;" in text and ".png, .svg or .pdf" in text
    assert "transformer: encoder and decoder layers, each" in text
    assert "the least number of timed calls per implementation" in text


def test_profile_memory_help_states_its_defaults(capsys):
    text = _help("profile-memory", capsys=capsys)
    assert "``" not in text
    for default in ("--model {", "default: bert-base", "--batch BATCH default: 1", "--seq SEQ default: 2048",
                    "fwd+bwd: forward and backward of a training step (default)"):
        assert default in text, default


def test_bench_plot_keeps_equal_lines_apart(tmp_path, monkeypatch):
    """Two implementations with equal values (eager and reference allocate the same score matrix)
    are two visible lines: each implementation has its own marker and dash pattern, the same in
    every panel, and the memory panel has a legend of its own."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from fused_attn.bench import cli as bench_cli
    from fused_attn.bench import plots

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    records = [bench_cli.record("attention", impl, "cpu", "float32", "fwd", {"batch": 1, "heads": 2, "seq": seq},
                                median_ms=1.0, min_ms=1.0, max_ms=1.0, tflops=0.1, peak_mem_bytes=2**20 * seq)
               for impl in ("eager", "reference", "cpu") for seq in (16, 32)]
    plots.plot_bench(records, str(tmp_path / "p.png"))
    (fig,) = figures
    ax_rate, ax_mem = fig.axes
    for ax in (ax_rate, ax_mem):
        assert [line.get_label() for line in ax.lines] == ["eager", "reference", "cpu"]
        looks = {(line.get_marker(), line.get_linestyle(), line.get_markersize()) for line in ax.lines}
        assert len(looks) == 3
        # The larger markers and wider lines lie under the smaller ones.
        by_size = sorted(ax.lines, key=lambda line: -line.get_markersize())
        assert [line.get_zorder() for line in by_size] == sorted(line.get_zorder() for line in ax.lines)
        assert ax.get_legend() is not None
    assert [line.get_marker() for line in ax_rate.lines] == [line.get_marker() for line in ax_mem.lines]


@pytest.mark.parametrize("flags, causal", [
    ([], [False]),
    (["--causal", "both"], [False, True]),
    (["--causal", "true"], [True]),
])
def test_default_cpu_run_takes_an_explicit_causal_both(flags, causal):
    """The default CPU run times attention without a causal mask unless --causal is given; an
    explicit --causal both gives both (it was taken for the default and gave only the full mask)."""
    from fused_attn.bench import cli as bench_cli

    plan = bench_cli._plan(_parse("--device", "cpu", "--seq", "8", *flags), CPU)
    (attention,) = [s for suite, s in plan if suite == "attention"]
    assert sorted({shape["causal"] for shape in suites.attention_shapes(attention)}) == causal


def test_an_explicit_causal_both_is_noted_where_no_suite_takes_it(capsys, monkeypatch):
    """--causal both given to a suite without attention changes nothing, and is said so, as any
    other value of it is."""
    test_flags_a_suite_does_not_take_are_noted(
        ["--suite", "ffn", "--causal", "both"],
        ["note: --causal has no effect on suite ffn (it takes --rows, --hidden, --activation and --backends)"], capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    ([*TINY, "--hidden", "8,16,8"], "--hidden: 8 is repeated in '8,16,8'; expected each value once"),
    ([*TINY, "--hidden", "8,08"], "--hidden: 8 is repeated in '8,08'; expected each value once"),
    (["bench", "--suite", "attention", "--seq", "16, 16"], "--seq: 16 is repeated in '16, 16'; expected each value once"),
    (["bench", "--suite", "model", "--models", "bert-tiny,bert-tiny"],
     "--models: bert-tiny is repeated in 'bert-tiny,bert-tiny'; expected each value once"),
    ([*TINY, "--backends", "cpu,cpu"], "--backends: cpu is repeated in 'cpu,cpu'; expected each value once"),
])
def test_a_repeated_list_item_is_a_usage_error(args, message, capsys):
    """A value given twice in a list flag would run the same cases twice, as records that cannot be
    told apart (and a plot line doubling back on itself): refused like an empty item, usually a
    typo for another value."""
    test_bad_arguments_one_line_error(args, message, capsys)


def test_hard_linked_outputs_are_one_file(tmp_path, capsys):
    """Two output flags naming one file through a hard link are refused as two spellings of a path
    are: the CSV would otherwise overwrite the JSON, exit status 0."""
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    json_path.write_text("")
    csv_path.hardlink_to(json_path)
    test_bad_arguments_one_line_error([*TINY, "--json", str(json_path), "--csv", str(csv_path)],
                                      f"--json and --csv name the same file, {csv_path}", capsys)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_names_its_flag_and_the_others_are_written(tmp_path, capsys):
    """An output whose write fails after the run (a full disk: /dev/full) is named, flag and path,
    in the one-line error, exit status 1; the other outputs are still written."""
    out = tmp_path / "r.csv"
    code, captured = _run([*TINY, "--json", "/dev/full", "--csv", str(out)], capsys)
    lines = captured.err.strip().splitlines()
    assert code == 1 and lines == ["fused-attn bench: error: --json /dev/full: could not be written "
                                   "(No space left on device)"], lines
    assert out.exists() and f"wrote {out}" in captured.out
    code = cli.main(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--seq", "8", "--device", "cpu",
                     "--json", "/dev/full"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines == ["fused-attn profile-memory: error: --json /dev/full: could not be written "
                                   "(No space left on device)"], lines


@pytest.mark.cuda
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_snapshot_that_cannot_be_written_names_its_flag_and_the_json_is_written(tmp_path, capsys):
    out = tmp_path / "mem.json"
    code = cli.main(["profile-memory", "--model", "bert-tiny", "--layers", "1", "--seq", "8", "--device", "cuda",
                     "--snapshot", "/dev/full", "--json", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1 and lines == ["fused-attn profile-memory: error: --snapshot /dev/full: could not be written "
                                   "(No space left on device)"], lines
    assert out.exists() and f"wrote {out}" in captured.out
