"""Running model-written code: each program in its own isolated Python process, in a fresh
temporary directory, under limits, and judged by its exit status.

The child runs `python -I -B` (no user site, no environment variables, no current-directory
imports, no bytecode written) with, before the program's first line:
- resource limits: address space (default 1 GiB), CPU seconds, file size, no core dumps;
- an audit hook (PEP 578; it cannot be removed once added) that refuses process creation
  (fork, exec, spawn, subprocess, os.system), network sockets, ctypes and other native-code
  loading, and opening files for writing, removing or renaming anything outside its directory.
The parent kills the child's whole process group at the wall-clock limit. A program passes only
by exiting 0 in time. This bounds an ordinary hostile or buggy completion (endless loops, fork
bombs, memory bombs, file deletion); it is not a security boundary against an attacker who
targets CPython itself, which needs a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

GUARD = r"""
import os as _os, resource as _resource, sys as _sys
_mem = {memory}
_resource.setrlimit(_resource.RLIMIT_AS, (_mem, _mem))
_resource.setrlimit(_resource.RLIMIT_CPU, ({cpu}, {cpu}))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
_resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))
_home = _os.path.realpath(_os.getcwd())
_refused = {{
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "socket.connect",
    "socket.bind", "socket.__new__", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "os.chdir", "os.chmod", "os.chown", "shutil.rmtree", "os.link", "os.symlink",
}}
_writes = {{"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.mkdir", "os.utime"}}

def _inside(path):
    try:
        path = _os.fsdecode(path) if not isinstance(path, int) else None
    except TypeError:
        return False
    return path is None or _os.path.realpath(path).startswith(_home + _os.sep)

def _hook(event, args):
    if event in _refused:
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if event == "open":
        mode, flags = args[1], args[2]
        writing = any(c in str(mode) for c in "wax+") if mode is not None else bool(
            flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC)
        )
        if writing and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {{args[0]!r}} is not allowed")
    if event in _writes and not _inside(args[0]):
        raise PermissionError(f"sandbox: {{event}} outside the sandbox is not allowed")

_sys.addaudithook(_hook)
del _hook
"""


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed" (nonzero exit), "timeout"
    output: str  # the end of stderr, for records


def run_program(program: str, timeout: float = 10.0, memory_bytes: int = 1 << 30) -> Outcome:
    """Run `program` in the sandbox; it passes if it exits 0 within `timeout` seconds."""
    guard = GUARD.format(memory=memory_bytes, cpu=max(1, int(timeout) + 1))
    with tempfile.TemporaryDirectory(prefix="herd-sandbox-") as home:
        path = os.path.join(home, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(guard + "\n" + program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", path],
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home},
            start_new_session=True,  # its own process group, killed whole
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(False, "timeout", "")
        finally:
            _kill_group(proc)
        text = err.decode("utf-8", "replace")[-2000:]
        return Outcome(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", text)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
