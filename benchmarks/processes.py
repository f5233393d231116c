"""Run one benchmark contender in a process of its own, so no peak mixes with another's.

The child prints its row as JSON on its last stdout line; a failure becomes the
short text its table cell shows.
"""
from __future__ import annotations

import json
import subprocess
import sys


def run_child(command: list[str], timeout: float | None = None) -> dict | str:
    """The child's JSON row, or why there is none ("out of memory", "failed: ...")."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "stopped: time budget spent"
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    sys.stderr.write(done.stderr[-4000:])
    return failure(done.stderr)


def failure(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if "OutOfMemoryError" in last or "out of memory" in last.lower():
        return "out of memory"
    if last.startswith("not run:"):  # the child said why it did not run
        return last[:160].replace("|", "/")
    return "failed: " + last[:160].replace("|", "/")
