"""Test cases run in child processes: a crash in native code (a segfault, an abort) then fails the
case that was running instead of killing the test session, and a new child takes the remaining
cases. The child reports one JSON line before (``start``) and after each case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300


def report_cases(run: Callable[[str], None], names: list[str], source: str) -> None:
    """The child's side: runs ``run(name)`` for each name, printing its result as a JSON line; a
    failure's detail names the last line of ``source`` (the test file) it passed through."""
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        try:
            run(name)
            result = {"case": name, "ok": True}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the test
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            frames = traceback.extract_tb(err.__traceback__)
            where = next((f"{f.name}:{f.lineno}" for f in reversed(frames) if f.filename == source), "")
            result = {"case": name, "ok": False, "detail": f"{detail} (at {where})"}
        print(json.dumps(result), flush=True)


def run_cases(child: str, names: list[str], prelude: str = "") -> dict[str, dict]:
    """The parent's side: runs ``names`` in child processes, each executing ``prelude`` and then
    ``child`` (code that calls :func:`report_cases`) with ``names`` bound to the cases still to
    run; a child that dies fails the case it was in, and a new child takes the remaining ones.
    Returns each case's result: ``ok``, and ``detail`` where it failed."""
    pending, results = list(names), {}
    while pending:
        code = f"{prelude}\nnames = {pending!r}\n{child}"
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S, env=dict(os.environ))
            stdout, returncode, stderr = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            returncode, stderr = f"timed out after {CHILD_TIMEOUT_S} s", ""
        started = None
        for line in stdout.splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if "start" in record:
                started = record["start"]
            elif "case" in record:
                results[record["case"]], started = record, None
        if started is None and any(n not in results for n in pending):
            started = next(n for n in pending if n not in results)  # died before its first case
        if started is not None:
            results[started] = {"case": started, "ok": False,
                                "detail": f"the child process died (exit {returncode}) in this case: {stderr[-3000:]}"}
        pending = [n for n in pending if n not in results]
    return results
