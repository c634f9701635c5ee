"""`make gpu-check`: every test on the GPU, then the benchmarks, written up as a report.

Meant for a GPU machine without a package registry, after the extension was built in place
with what is installed there. Writes benchmarks/results/<date>-<gpu>[-tag].md and .json; exits
non-zero when a test failed (the report is written either way). On a machine that limits each
command to a few minutes, split the work: `--skip-bench --tag tests`, then
`--skip-tests --suites attention --tag attention`, and so on; or, where the budget stopped the
tests, `--resume <that report>.json` runs only those that did not pass there (the report records
each passed test's id, the slowest tests and each stage's wall time). With the tests (unless
`--skip-sanitizer`), small forward + backward calls of every op on the cuda backend (SANITIZER_SCRIPT)
also run under compute-sanitizer (memcheck, racecheck); without the tool the report says so and why.
With the benchmarks, first `benchmarks/host_time.py` on the GPU (each op's tiny calls through the
plain call's C++ entry, the Python path and torch's own functions: the host time per call), and
(unless `--skip-memory`) at the end `fused-attn profile-memory` of a BERT-base layer at seq 4096;
each suite's plot and the memory plot are written next to the report as PNGs.
torch.compile rows are left out unless `--compile` (compiling every case takes far longer than
the rest of the run).

Time: `--budget SECONDS` bounds the whole run so that the report is written before a
per-command time limit; each stage gets what is left (a stage that runs out is interrupted
with SIGINT, so pytest and `fused-attn bench` still report what they finished), and the stages
come in order of what matters most: the CUDA tests (at most --tests-share of the budget, half by
default, unless --skip-bench), the sanitizer, the host time per call, then the benchmarks in
PRIORITY order, then the memory profile. The tests are the ones marked `cuda` (every test on a
CUDA device; the CPU ones run in CI) unless `--all-tests`, in rounds that each take one case of
every test function (FUSED_ATTN_TEST_ORDER=spread, tests/conftest.py), the kernels' parity files
first within a round (FIRST_TESTS): a budget that stops them has tried every function, and a
--resume runs the cases it did not reach.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# (suite, dtype, mode, further `fused-attn bench` flags[, environment]) of the benchmark sweep, one run
# each, most wanted first: the attention (head dims 64 and 128) and FFN / Add & Norm targets, the models,
# then the rest. A run with an environment of its own (a layout pinned for comparison) keeps only its
# fused backends' rows, named with that environment.
D128 = ("--head-dim", "128", "--seq", "1024,4096,16384")
# The cuda kernels' one-strip layout (64 rows per block), beside the default's.
ONE_STRIP = {"FUSED_ATTN_CUDA_BLOCK_ROWS": "64"}
CUDA_ONLY = ("--backends", "cuda", "--seq", "1024,4096,16384")
# A training step's attention with BERT's dropout, against PyTorch's kernels with theirs.
DROPOUT = ("--dropout", "0.1", "--causal", "false", "--seq", "1024,4096")
# Where the attention's time goes, kernel by kernel, at one length (a report section of its own).
KERNELS = ("--seq", "4096", "--kernels")
# The FFN with ReLU (torch's Transformer layers' default), whose cuda path applies it in a pass of its own.
RELU = ("--activation", "relu")
PRIORITY = [
    ("attention", "bfloat16", "fwd", ()), ("attention", "bfloat16", "fwd+bwd", ()),
    ("attention", "bfloat16", "fwd+bwd", KERNELS),
    ("attention", "bfloat16", "fwd", CUDA_ONLY, ONE_STRIP), ("attention", "bfloat16", "fwd+bwd", CUDA_ONLY, ONE_STRIP),
    ("attention", "bfloat16", "fwd", D128), ("attention", "bfloat16", "fwd+bwd", D128),
    ("attention", "bfloat16", "fwd+bwd", DROPOUT),
    ("ffn", "bfloat16", "fwd+bwd", ()), ("add_layer_norm", "bfloat16", "fwd+bwd", ()),
    ("model", "bfloat16", "fwd+bwd", ()), ("model", "bfloat16", "fwd", ()),
    ("layer_norm", "bfloat16", "fwd+bwd", ()), ("softmax", "bfloat16", "fwd+bwd", ()), ("ffn", "bfloat16", "fwd", ()),
    ("add_layer_norm", "bfloat16", "fwd", ()), ("layer_norm", "bfloat16", "fwd", ()), ("softmax", "bfloat16", "fwd", ()),
    ("attention", "float16", "fwd", ()), ("ffn", "float16", "fwd", ()), ("ffn", "bfloat16", "fwd+bwd", RELU),
]
# Seconds kept back from a stage's share of the budget for the stages' own wind-down and the report.
RESERVE = 20
# A stage given less than this is not started.
MIN_STAGE = 30
# After SIGINT, how long a stage may take to write what it has.
GRACE = 45


class Budget:
    """Wall-clock seconds left for the run (unbounded without --budget)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def share(self, default: int, fraction: float = 1.0) -> int | None:
        """A stage's timeout: its default, cut to what is left (and to ``fraction`` of the whole
        budget); None when too little is left to start."""
        if self.deadline is None:
            return default
        left = min(int(self.deadline - time.monotonic()), int(fraction * self.seconds)) - RESERVE - GRACE
        return min(default, left) if left >= MIN_STAGE else None


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str]:
    """Runs cmd; past the timeout it gets SIGINT (pytest and the bench CLI then report what they
    finished) and GRACE seconds more before it is killed. Returns (exit code, 124 on timeout; output).
    The child starts with SIGINT's default action even where this process ignores it (a shell
    starts background commands, e.g. `make gpu-check &`, with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler): otherwise the interrupt would be lost and the child
    killed GRACE seconds later with nothing written."""
    print("+", " ".join(cmd), flush=True)
    reset_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=reset_sigint)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        output, code = (output or "") + f"\n[interrupted after {timeout}s]", 124
    print(output[-4000:], flush=True)
    return code, output


def test_workers(python: str) -> int:
    """pytest-xdist workers for the test run: most of its time is Triton compiling kernels, one
    CPU core per compilation, so processes sharing the GPU finish several times sooner: one per
    core but two (the GPU work of the tests is small; 8 workers on the H200's 16 cores ran 519
    tests in 200 s)."""
    code = subprocess.run([python, "-c", "import xdist"], capture_output=True).returncode
    return 0 if code != 0 else max(1, min(14, (os.cpu_count() or 2) - 2))


def node_id(classname: str, name: str) -> str:
    """A junit testcase's pytest node id: ``tests.test_x`` + ``test_y[p]`` -> ``tests/test_x.py::test_y[p]``
    (the suite's tests are module-level functions)."""
    return f"{classname.replace('.', '/')}.py::{name}"


def passed_in(reports: list[Path]) -> set[str]:
    """The node ids of the tests that passed in earlier reports' runs (``--resume``)."""
    passed = set()
    for report in reports:
        passed.update(json.loads(Path(report).read_text())["tests"].get("passed_ids", []))
    return passed


# Test files first in every round of the spread order (pytest collects files in the order given),
# then the rest in name order: the kernels' parity (the two-strip bitwise check, attention, every
# Triton tile config, which the attention tests run one per kernel, the other ops), then the
# numerics at extreme scales.
FIRST_TESTS = ["test_cuda_block_strips.py", "test_attention.py", "test_triton_gpu_tiles.py", "test_add_layer_norm.py",
               "test_layer_norm.py", "test_ffn.py", "test_softmax.py", "test_numerics.py"]


def ordered_test_files() -> list[str]:
    """tests/test_*.py, FIRST_TESTS first, as paths relative to the repository's root."""
    names = sorted(path.name for path in (ROOT / "tests").glob("test_*.py"))
    first = [name for name in FIRST_TESTS if name in names]
    return [f"tests/{name}" for name in first + [name for name in names if name not in first]]


def run_tests(python: str, tmp: Path, timeout: int, all_tests: bool, resume: list[Path] | None = None) -> dict:
    junit = tmp / "junit.xml"
    # One config per Triton kernel: the tests cover many shapes, and autotuning each would spend
    # the run compiling; the benchmarks autotune. The cases in rounds over the test functions
    # (tests/conftest.py: spread_order): the 2026-12-04 run, in file order, stopped at its budget
    # inside test_attention.py, 519 of 1934 tests, with every other op untried on CUDA.
    env = {"TRITON_INTERPRET": "0", "FUSED_ATTN_TRITON_AUTOTUNE": "0", "FUSED_ATTN_TEST_ORDER": "spread"}
    select = [] if all_tests else ["-m", "cuda"]
    done = sorted(passed_in(resume)) if resume else []
    for test in done:
        select += ["--deselect", test]
    workers = test_workers(python)
    parallel = ["-n", str(workers)] if workers > 1 else []
    code, output = _run([python, "-m", "pytest", *ordered_test_files(), "-q", "-rfE", *select, *parallel,
                         f"--junitxml={junit}"], timeout=timeout, env=env)
    summary = {"exit_code": code, "tail": output[-3000:], "failed_tests": [],
               "selection": ("all tests" if all_tests else "tests marked cuda")
               + (f", {workers} pytest-xdist workers" if workers > 1 else "")}
    if resume:
        summary["resumed"] = {"reports": [Path(r).name for r in resume], "not_rerun": len(done)}
    if code == 124:
        summary["interrupted"] = f"stopped after {timeout}s (--budget)"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] = int(suite.get(key, 0))
        durations, passed = [], []
        for case in suite.iter("testcase"):
            test = node_id(case.get("classname"), case.get("name"))
            durations.append((float(case.get("time") or 0.0), test))
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                summary["failed_tests"].append({"test": test, "message": (problem.get("message") or "")[:500]})
            elif case.find("skipped") is None:
                passed.append(test)
        # What a later run with --resume leaves out, and where this one's time went.
        summary["passed_ids"] = sorted(passed)
        summary["slowest"] = [{"test": test, "seconds": round(t, 1)}
                              for t, test in sorted(durations, reverse=True)[:10]]
    return summary


def timed(stages: dict[str, int], stage: str, action: Callable[[], object]):
    """``action()``, its wall time (whole seconds) recorded in ``stages`` under ``stage``, also when it raises."""
    started = time.monotonic()
    try:
        return action()
    finally:
        stages[stage] = round(time.monotonic() - started)


def run_benchmarks(python: str, tmp: Path, suites: list[str], compile_reference: bool,
                   budget: Budget, stages: dict) -> tuple[list[dict], list[str]]:
    records, logs = [], []
    for suite, dtype, mode, flags, *env in (run for run in PRIORITY if run[0] in suites):
        env = env[0] if env else {}
        pinned = " ".join(f"{key}={value}" for key, value in env.items())
        run = " ".join([dtype, mode, *flags, *([pinned] if pinned else [])])
        timeout = budget.share(900)
        if timeout is None:
            from fused_attn.bench.cli import DTYPES, record

            records.append(record(suite, "all", "cuda", DTYPES[dtype], mode, {},
                                  skipped=f"the {run} run: not started, the --budget was spent"))
            continue
        path = tmp / f"bench-{_slug(f'{suite} {run}')}.json"
        code, output = timed(stages, f"bench {suite} {run}", lambda: _run(
            [python, "-m", "fused_attn", "bench", "--suite", suite, "--device", "cuda", "--dtype", dtype,
             "--mode", mode, *flags, "--json", str(path)] + ([] if compile_reference else ["--no-compile"]),
            timeout=timeout, env=env or None,
        ))
        logs.append(output[-6000:])
        if path.exists():  # an interrupted run writes the cases it finished
            run_records = json.loads(path.read_text())
            if env:
                from fused_attn.backends import AUTO_ORDER

                fused = {name for order in AUTO_ORDER.values() for name in order}
                run_records = [{**r, "impl": f"{r['impl']} [{pinned}]"} for r in run_records if r["impl"] in fused]
            records += run_records
    return records, logs


# Small cases that reach every code path of the CUDA kernels: attention with cross lengths and partial
# tiles, a single query and key, causal + bool mask, key padding masks (the key spans: a middle range
# with dropout, none seen), a float mask with its gradient, dropout, grouped key/value heads (132 query
# heads of 200 rows, with dropout: enough 128-row blocks for every kernel's two strips per warp on an
# H100/H200), an unaligned head dim (element copies instead of cp.async), a padded one (72 in tiles of
# 96), the split head dim 256 with value head dims apart from the query's, and operands at storage
# offset 1 (every vector path declined); softmax in a warp and a block per row; LayerNorm, Add & Norm
# and the FFN at widths that vectorise, aligned and not. The script's first lines name the device and
# backend (a test runs it on the cpu backend).
SANITIZER_SCRIPT = """
import torch, fused_attn
from fused_attn import _extension
DEVICE, BACKEND = "cuda", "cuda"
assert _extension.has_kernel("attention_fwd", BACKEND), f"fused_attn._C has no {BACKEND} attention kernel"
torch.manual_seed(0)
def tensor(*shape, dtype=torch.float32, shift=False, grad=True):
    t = torch.randn(*shape, device=DEVICE, dtype=dtype)
    if shift:  # the same values one element past the allocation's (16-byte aligned) start
        t = torch.empty(t.numel() + 1, device=DEVICE, dtype=dtype)[1:].view(t.shape).copy_(t).detach()
        assert t.data_ptr() % 16
    return t.requires_grad_(grad)
def attention(q_len, k_len, head_dim, dtype, head_dim_v=None, kv_heads=2, shift=False, **kw):
    q = tensor(1, 2 * kw.pop("group", 1), q_len, head_dim, dtype=dtype, shift=shift)
    k = tensor(1, kv_heads, k_len, head_dim, dtype=dtype, shift=shift)
    v = tensor(1, kv_heads, k_len, head_dim_v or head_dim, dtype=dtype, shift=shift)
    fused_attn.scaled_dot_product_attention(q, k, v, backend=BACKEND, **kw).sum().backward()
attention(70, 45, 64, torch.float16, attn_mask=torch.rand(1, 1, 70, 45, device=DEVICE) > 0.2, is_causal=True)
attention(33, 80, 40, torch.bfloat16, attn_mask=tensor(1, 2, 33, 80, dtype=torch.bfloat16))
attention(64, 64, 20, torch.float16, dropout_p=0.3)
attention(1, 1, 72, torch.float16)
attention(130, 33, 64, torch.bfloat16, group=2, enable_gqa=True, is_causal=True)
attention(17, 17, 256, torch.bfloat16, is_causal=True)
attention(33, 40, 64, torch.float16, head_dim_v=200)
attention(40, 33, 200, torch.bfloat16, head_dim_v=64)
attention(65, 33, 64, torch.float16, shift=True, attn_mask=tensor(1, 2, 65, 33, dtype=torch.float16, shift=True))
keys = torch.arange(200, device=DEVICE)
attention(100, 200, 64, torch.float16, attn_mask=((keys >= 70) & (keys < 150)).view(1, 1, 1, 200), dropout_p=0.1)
attention(20, 130, 96, torch.bfloat16, attn_mask=torch.zeros(1, 1, 1, 130, dtype=torch.bool, device=DEVICE))
attention(200, 200, 64, torch.float16, group=66, enable_gqa=True, is_causal=True, dropout_p=0.1)
for n in (77, 3000, 5000):
    x = tensor(2, 3, 5, n)
    fused_attn.softmax(x, mask=torch.rand(n, device=DEVICE) > 0.1, scale=0.5, backend=BACKEND).sum().backward()
fused_attn.softmax(tensor(3, 40, dtype=torch.float16, shift=True), backend=BACKEND).sum().backward()
for dtype in (torch.float16, torch.float32):
    for shift in (False, True):
        x, r = tensor(5, 64, dtype=dtype, shift=shift), tensor(5, 64, dtype=dtype, shift=shift)
        w, b = tensor(64, dtype=dtype, shift=shift), tensor(64, dtype=dtype, shift=shift)
        fused_attn.layer_norm(x, (64,), w, b, backend=BACKEND).sum().backward()
        fused_attn.add_layer_norm(x, r, w, b, dropout_p=0.1, input_bias=b, backend=BACKEND).sum().backward()
        w1, b1 = tensor(48, 64, dtype=dtype, shift=shift), tensor(48, dtype=dtype, shift=shift)
        w2, b2 = tensor(64, 48, dtype=dtype, shift=shift), tensor(64, dtype=dtype, shift=shift)
        fused_attn.linear_gelu(x, w1, b1, "tanh", backend=BACKEND).sum().backward()
        fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=0.1, backend=BACKEND).sum().backward()
if DEVICE == "cuda":
    torch.cuda.synchronize()
print("sanitizer workload done")
"""


def run_host_time(python: str, tmp: Path, timeout: int, device: str = "cuda", calls: int = 1000,
                  repeats: int = 10) -> dict:
    """``benchmarks/host_time.py`` on the GPU: tiny calls of every op through the plain call's C++
    entry, through the Python path and as torch's own functions, without and with autograd
    recording (where launches bound a model, this is its time per op). Run as a module from the
    repository's root, which puts the root on the path: the package is built in place there, not
    installed."""
    path = tmp / "host-time.json"
    code, output = _run(
        [python, "-m", "benchmarks.host_time", "--device", device, "--both", "--calls", str(calls),
         "--repeats", str(repeats), "--json", str(path)],
        timeout=timeout,
    )
    if code != 0 or not path.exists():
        return {"failed": output[-3000:]}
    return {"records": json.loads(path.read_text())}


def run_memory_profile(python: str, tmp: Path, plot: Path, timeout: int) -> dict:
    """``fused-attn profile-memory`` of one BERT-base layer at a long sequence, plain vs fused."""
    path = tmp / "memory.json"
    code, output = _run(
        [python, "-m", "fused_attn", "profile-memory", "--model", "bert-base", "--layers", "1", "--batch", "1",
         "--seq", "4096", "--device", "cuda", "--dtype", "bfloat16", "--mode", "fwd+bwd", "--json", str(path),
         "--plot", str(plot)],
        timeout=timeout,
    )
    if code != 0 or not path.exists():
        return {"failed": output[-3000:]}
    return {**json.loads(path.read_text()), "plot": plot.name if plot.exists() else None}


def profiled(record: dict) -> bool:
    """Whether a benchmark record is of a --kernels run: reported in its own section, not in the
    tables and plots of the sweep (whose lengths it repeats)."""
    return record.get("kernels") is not None


def write_plots(records: list[dict], stem: str) -> dict[str, str]:
    """One PNG per suite next to the report: {suite: file name, or why there is none}."""
    from fused_attn.bench import plots

    records = [r for r in records if not profiled(r)]
    made = {}
    for suite in sorted({r["suite"] for r in records}):
        path = RESULTS / f"{stem}-{suite}.png"
        try:
            plots.plot_bench([r for r in records if r["suite"] == suite], str(path))
            made[suite] = path.name
        except Exception as exc:  # e.g. matplotlib missing on the GPU machine: the tables stand alone
            made[suite] = f"no plot: {type(exc).__name__}: {exc}"
    return made


def run_sanitizer(python: str, budget: Budget) -> dict:
    """memcheck and racecheck of SANITIZER_SCRIPT; {"skipped": why} without compute-sanitizer."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    tool = shutil.which("compute-sanitizer")
    in_toolkit = os.path.join(cuda_home, "bin", "compute-sanitizer")
    if tool is None and os.path.isfile(in_toolkit):
        tool = in_toolkit
    if tool is None:
        return {"skipped": f"compute-sanitizer not found on PATH or in {cuda_home}/bin"}
    results = {}
    for check in ("memcheck", "racecheck"):
        timeout = budget.share(900)
        if timeout is None:
            results[check] = {"exit_code": None, "summary": "not run: the --budget was spent", "tail": ""}
            continue
        # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
        code, output = _run(
            [tool, "--tool", check, "--error-exitcode", "1", python, "-c", SANITIZER_SCRIPT],
            timeout=timeout, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        )
        refused = re.search(r".*Device not supported.*", output)
        if refused:  # the tool runs no check on this device (seen under gVisor): none is worth a try
            return {"skipped": f"compute-sanitizer refused the device: {refused.group(0).strip()}"}
        summary = re.findall(r"ERROR SUMMARY: .*", output)
        if not summary and code not in (0, 124):  # no verdict: its last line says why
            summary = [line.strip() for line in output.splitlines() if line.strip()][-1:]
        results[check] = {"exit_code": code, "summary": summary[-1] if summary else "", "tail": output[-3000:]}
    return results


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def parse_suites(text: str) -> list[str]:
    """``--suites``: ``all`` or comma-separated suite names, each one `fused-attn bench` knows (a
    misspelt one would otherwise select no run and leave the report silently without it)."""
    from fused_attn.bench.suites import SUITES

    if text == "all":
        return sorted(SUITES)
    suites = [name.strip() for name in text.split(",")]
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown suite {unknown[0]!r}; expected all or some of "
                                         f"{', '.join(sorted(SUITES))}")
    return suites


def render_markdown(facts: dict, tests: dict, records: list[dict], sanitizer: dict, plots: dict, memory: dict,
                    host_time: dict | None = None, stages: dict | None = None) -> str:
    from fused_attn.bench.cli import EAGER_NOTE, KERNELS_NOTE, kernel_text, not_run_counts, rate_text, shape_text

    lines = [f"# gpu-check: {facts.get('gpu')}", "", f"Date: {facts['date']}  ", f"torch {facts['torch']}, "
             f"CUDA {facts['torch_cuda']}, Triton {facts['triton']}, fused-attn {facts['fused_attn']}", ""]
    if stages:
        lines += ["Wall time per stage: " + ", ".join(f"{stage} {seconds} s" for stage, seconds in stages.items()), ""]
    lines += ["## Tests", ""]
    if tests.get("skipped_run"):
        lines.append("not run in this report")
    elif "tests" in tests:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"{passed} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"(pytest exit code {tests['exit_code']}; {tests.get('selection', 'all tests')})")
    else:
        lines += ["pytest produced no report:", "", "```", tests["tail"], "```"]
    if tests.get("interrupted"):
        lines.append(f"(interrupted: {tests['interrupted']}; the counts are of the tests that ran)")
    if tests.get("resumed"):
        lines.append(f"(resumed: {tests['resumed']['not_rerun']} tests that passed in "
                     f"{', '.join(tests['resumed']['reports'])} were not run again)")
    for failure in tests["failed_tests"]:
        lines.append(f"- FAILED `{failure['test']}`: {failure['message']}")
    if tests.get("slowest"):
        lines.append("- slowest: " + ", ".join(f"`{t['test']}` {t['seconds']} s" for t in tests["slowest"][:5]))
    lines += ["", "## compute-sanitizer (small calls of every op on the cuda backend, fwd + bwd)", ""]
    if "skipped" in sanitizer:
        lines.append(f"skipped: {sanitizer['skipped']}")
    for check, result in sanitizer.items():
        if check != "skipped":
            verdict = {0: "clean", None: ""}.get(result["exit_code"], f"FAILED (exit code {result['exit_code']})")
            lines.append(f"- {check}: {verdict} {result['summary']}".replace(":  ", ": ").rstrip())
    if host_time:
        lines += ["", "## Host time per call (tiny calls, microseconds; no gradient / autograd recording)", ""]
        if "failed" in host_time:
            lines += ["benchmarks/host_time.py failed:", "", "```", host_time["failed"], "```"]
        else:
            by_op: dict[str, dict[bool, dict]] = {}
            for r in host_time["records"]:
                by_op.setdefault(r["op"], {})[r["grad"]] = r
            lines += ["| op | C++ entry | Python path | torch | entry / torch | triton backend |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for op, modes in by_op.items():
                entry, python, torch_, triton_ = (
                    " / ".join(f"{modes[g][key]:.1f}" for g in (False, True) if g in modes and key in modes[g]) or "-"
                    for key in ("entry_us", "python_us", "torch_us", "triton_us"))
                ratio = " / ".join(f"{modes[g]['entry_us'] / modes[g]['torch_us']:.2f}" for g in (False, True)
                                   if g in modes)
                lines.append(f"| {op} | {entry} | {python} | {torch_} | {ratio} | {triton_} |")
    if memory:
        lines += ["", "## Memory: one BERT-base layer, batch 1, seq 4096, bf16, forward + backward", ""]
        if "failed" in memory:
            lines += ["profile-memory failed:", "", "```", memory["failed"], "```"]
        else:
            plain, fused = memory["plain"]["peak_bytes"], memory["fused"]["peak_bytes"]
            lines.append(f"peak: plain {plain / 2**20:.0f} MiB, fused {fused / 2**20:.0f} MiB, "
                         f"fused/plain {memory['ratio']:.3f}")
            for key, ratio, what in (("forward_peak_bytes", "forward_ratio", "forward peak"),
                                     ("saved_bytes", "saved_ratio", "saved for backward")):
                if memory.get(ratio) is not None:
                    lines.append(f"{what}: plain {memory['plain'][key] / 2**20:.0f} MiB, fused "
                                 f"{memory['fused'][key] / 2**20:.0f} MiB, fused/plain {memory[ratio]:.3f}")
            if memory.get("plot"):
                lines += ["", f"![memory]({memory['plot']})"]
    lines += ["", "## Benchmarks", "", f"{EAGER_NOTE}. Rates at the median time; % of the GPU's published dense "
              "peak.", ""]
    stale = next((r["extension_stale"] for r in records if r.get("extension_stale")), None)
    if stale:
        lines += [f"**The extension was stale when timed** ({stale}): its rows time the build it had.", ""]
    for suite, plot in plots.items():
        lines.append(f"![{suite}]({plot})" if plot.endswith(".png") else f"- {suite}: {plot}")
    lines += ["", "| suite | shape | dtype | mode | impl | median ms | rate | % peak | vs eager | vs torch | peak MiB |",
              "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r.get("skipped") or profiled(r):  # every bench record has the key: null when it ran
            continue
        peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
        fraction = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") is not None else "-"
        vs_torch = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") is not None else "-"
        vs_eager = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else "-"
        lines.append(f"| {r['suite']} | {shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                     f"{r['median_ms']:.4f} | {rate_text(r)} | {fraction} | {vs_eager} | "
                     f"{vs_torch} | {peak} |")
    kernel_rows = [r for r in records if not r.get("skipped") and profiled(r)]
    if kernel_rows:
        lines += ["", f"### {KERNELS_NOTE[0].upper()}{KERNELS_NOTE[1:]}", "",
                  "| shape | mode | impl | median ms | kernels (ms) |", "| --- | --- | --- | ---: | --- |"]
        lines += [f"| {shape_text(r['shape'])} | {r['mode']} | {r['impl']} | {r['median_ms']:.4f} | "
                  f"{kernel_text(r['kernels'])} |" for r in kernel_rows]
    not_run = not_run_counts(records)
    if not_run:
        lines += ["", "Not run:", ""]
        lines += [f"- {suite} `{impl}` ({n} case{'s' * (n > 1)}): {why}" for (suite, impl, why), n in not_run.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--skip-bench", action="store_true", help="tests only")
    parser.add_argument("--skip-sanitizer", action="store_true", help="no compute-sanitizer run")
    parser.add_argument("--suites", type=parse_suites, default="all",
                        help="comma-separated bench suites (default: all)")
    parser.add_argument("--tag", default="", help="suffix of the report's file name (e.g. tests, bench)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the references (slow)")
    parser.add_argument("--skip-memory", action="store_true", help="no profile-memory run")
    parser.add_argument("--all-tests", action="store_true", help="every test, not only those marked cuda")
    parser.add_argument("--budget", type=int, default=None,
                        help="seconds for the whole run; later stages get what is left (default: no bound)")
    parser.add_argument("--resume", type=Path, nargs="+", default=None, metavar="REPORT",
                        help="earlier reports' .json: the tests that passed there are not run again (the report "
                             "says how many), e.g. after a run that --budget stopped")
    parser.add_argument("--tests-share", type=float, default=0.5,
                        help="the part of --budget the tests may take, the rest kept for the benchmarks (default 0.5)")
    sys.path.insert(0, str(ROOT))
    args = parser.parse_args()
    budget = Budget(args.budget)

    from fused_attn import info

    facts = info.collect()
    if not facts["gpu"]:
        print("gpu-check: no CUDA GPU is visible", file=sys.stderr)
        return 2
    facts["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    suites = args.suites
    stages: dict[str, int] = {}  # wall seconds of each stage run, in order
    with tempfile.TemporaryDirectory() as tmp:
        test_timeout = budget.share(1500, args.tests_share if not args.skip_bench else 1.0)
        if args.skip_tests or test_timeout is None:
            tests = {"exit_code": 0, "skipped_run": True, "failed_tests": [], "tail": ""}
        else:
            tests = timed(stages, "tests",
                          lambda: run_tests(args.python, Path(tmp), test_timeout, args.all_tests, args.resume))
        if args.skip_tests or args.skip_sanitizer:
            sanitizer = {"skipped": "--skip-tests" if args.skip_tests else "--skip-sanitizer"}
        else:
            sanitizer = timed(stages, "sanitizer", lambda: run_sanitizer(args.python, budget))
        host_timeout = budget.share(150)
        if args.skip_bench:
            host_time = {}
        elif host_timeout is None:
            host_time = {"failed": "not run: the --budget was spent"}
        else:
            host_time = timed(stages, "host time", lambda: run_host_time(args.python, Path(tmp), host_timeout))
        records, bench_logs = ([], []) if args.skip_bench else run_benchmarks(
            args.python, Path(tmp), suites, args.compile, budget, stages)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.date.today().isoformat()}-{_slug(facts['gpu'])}" + (f"-{args.tag}" if args.tag else "")
        memory_timeout = budget.share(600)
        if args.skip_bench or args.skip_memory:
            memory = {}
        elif memory_timeout is None:
            memory = {"failed": "not run: the --budget was spent"}
        else:
            memory = timed(stages, "memory profile", lambda: run_memory_profile(
                args.python, Path(tmp), RESULTS / f"{stem}-memory.png", memory_timeout))
    plots = write_plots(records, stem)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {"facts": facts, "tests": tests, "sanitizer": sanitizer, "host_time": host_time, "benchmarks": records,
             "memory": memory, "plots": plots, "bench_logs": bench_logs, "stages": stages},
            indent=2, default=str,
        )
    )
    (RESULTS / f"{stem}.md").write_text(render_markdown(facts, tests, records, sanitizer, plots, memory, host_time,
                                                        stages))
    print(f"gpu-check: wrote {RESULTS / stem}.md and .json")
    sanitizer_failed = any(r["exit_code"] not in (0, None) for c, r in sanitizer.items() if c != "skipped")
    return 0 if tests.get("exit_code") == 0 and not sanitizer_failed else 1


if __name__ == "__main__":
    sys.exit(main())
