"""`make gpu-check`: every test on the GPU, then the benchmarks, written up as a report.

Meant for a GPU machine without a package registry, after the extension was built in place
with what is installed there. Writes benchmarks/results/<date>-<gpu>[-tag].md and .json; exits
non-zero when a test failed (the report is written either way). A machine lent for a few
minutes per command can split the work: `--skip-bench --tag tests`, then
`--skip-tests --suites attention --tag attention`, and so on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# (dtype, mode) pairs of the op-level sweep; each is one `fused-attn bench` run.
BENCH_RUNS = [("bfloat16", "fwd"), ("bfloat16", "fwd+bwd"), ("float16", "fwd")]


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str]:
    print("+", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n[timed out after {timeout}s]"
    output = proc.stdout + proc.stderr
    print(output[-4000:], flush=True)
    return proc.returncode, output


def run_tests(python: str, tmp: Path) -> dict:
    junit = tmp / "junit.xml"
    # One config per Triton kernel: the tests cover many shapes, and autotuning each would spend
    # the run compiling; the benchmarks autotune.
    env = {"TRITON_INTERPRET": "0", "FUSED_ATTN_TRITON_AUTOTUNE": "0"}
    code, output = _run([python, "-m", "pytest", "tests", "-q", "-rfE", f"--junitxml={junit}"], timeout=1500, env=env)
    summary = {"exit_code": code, "tail": output[-3000:], "failures": []}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] = int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                summary["failures"].append(
                    {"test": f"{case.get('classname')}::{case.get('name')}", "message": (problem.get("message") or "")[:500]}
                )
    return summary


def run_benchmarks(python: str, tmp: Path, suites: list[str]) -> tuple[list[dict], list[str]]:
    records, logs = [], []
    for (dtype, mode), suite in ((run, suite) for run in BENCH_RUNS for suite in suites):
        path = tmp / f"bench-{suite}-{dtype}-{mode.replace('+', '')}.json"
        code, output = _run(
            [python, "-m", "fused_attn", "bench", "--suite", suite, "--device", "cuda", "--dtype", dtype,
             "--mode", mode, "--json", str(path)],
            timeout=900,
        )
        logs.append(output[-6000:])
        if code == 0 and path.exists():
            records += json.loads(path.read_text())
    return records, logs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def render_markdown(facts: dict, tests: dict, records: list[dict]) -> str:
    lines = [f"# gpu-check: {facts.get('gpu')}", "", f"Date: {facts['date']}  ", f"torch {facts['torch']}, "
             f"CUDA {facts['torch_cuda']}, Triton {facts['triton']}, fused-attn {facts['fused_attn']}", ""]
    lines += ["## Tests", ""]
    if tests.get("skipped_run"):
        lines.append("not run in this report")
    elif "tests" in tests:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"{passed} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"(pytest exit code {tests['exit_code']})")
    else:
        lines += ["pytest produced no report:", "", "```", tests["tail"], "```"]
    for failure in tests["failures"]:
        lines.append(f"- FAILED `{failure['test']}`: {failure['message']}")
    lines += ["", "## Benchmarks", "", "| suite | shape | dtype | mode | impl | median ms | rate | vs torch | peak MiB |",
              "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        shape = "x".join(str(v) for v in r["shape"].values())
        if "skipped" in r:
            lines.append(f"| {r['suite']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | skipped: {r['skipped']} | | |")
        else:
            rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
            peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
            lines.append(f"| {r['suite']} | {shape} | {r['dtype']} | {r['mode']} | {r['impl']} | {r['median_ms']:.4f} | "
                         f"{rate} | {r['speedup_vs_eager']:.2f}x | {peak} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--skip-bench", action="store_true", help="tests only")
    parser.add_argument("--suites", default="all", help="comma-separated bench suites (default: all)")
    parser.add_argument("--tag", default="", help="suffix of the report's file name (e.g. tests, bench)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from fused_attn import info

    facts = info.collect()
    if not facts["gpu"]:
        print("gpu-check: no CUDA GPU is visible", file=sys.stderr)
        return 2
    facts["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    from fused_attn.bench.suites import SUITES

    suites = sorted(SUITES) if args.suites == "all" else args.suites.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tests = {"exit_code": 0, "skipped_run": True, "failures": [], "tail": ""} if args.skip_tests else run_tests(
            args.python, Path(tmp)
        )
        records, bench_logs = ([], []) if args.skip_bench else run_benchmarks(args.python, Path(tmp), suites)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{_slug(facts['gpu'])}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"facts": facts, "tests": tests, "benchmarks": records, "bench_logs": bench_logs}, indent=2, default=str)
    )
    (RESULTS / f"{stem}.md").write_text(render_markdown(facts, tests, records))
    print(f"gpu-check: wrote {RESULTS / stem}.md and .json")
    return 0 if tests.get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
