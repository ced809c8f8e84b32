"""Nothing of a flow outlives it: Prefect's temporary API server is stopped even after a ``kill -9``.

Prefect starts its temporary server as a child process and stops it at exit, which a SIGKILL never
reaches. :func:`guard_temporary_server` tags the environment with a token (the server inherits it)
and starts a small watchdog process; when the flow's process is gone, the watchdog terminates every
process that carries the token. Linux (``/proc``) only; elsewhere it does nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VAR = "SMOOTHPURIFY_FLOW_TOKEN"


def guard_temporary_server() -> None:
    """Call once in the flow's process, before Prefect starts its server."""
    if not Path("/proc/self/environ").exists():
        return
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token
    subprocess.Popen([sys.executable, "-m", "flows.orphans", str(os.getpid()), token], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                                                if k != TOKEN_VAR})


def _tagged(token: str) -> list[int]:
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def watch(parent: int, token: str, poll: float = 0.5) -> None:
    """Wait for ``parent`` to end, then terminate whatever still carries ``token``."""
    while os.getppid() == parent:
        time.sleep(poll)
    for pid in _tagged(token):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
