"""Running one measurement per subprocess, so each gets its own peak memory and a cold start.

A benchmark script calls itself with `--worker JSON`; the worker prints `RESULT {json}` last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, from the forked parent.
    return status_mib("VmHWM")


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result))


def run_worker(script: str, job: dict, threads: int, label: str) -> dict | None:
    """Run `script --worker job` with `threads` threads; its result, or None (and its stderr
    printed) if it failed."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "0"}
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"{label} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None
