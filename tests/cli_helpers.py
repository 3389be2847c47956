"""The ``stargz-tui`` CLI run as a real subprocess, the way a user runs it.

``stargz_cli(*args, cwd=REPO_ROOT, env=None, stdin=None, input=None,
timeout=120) -> subprocess.CompletedProcess``: ``python -m stargz_tui ARGS``
with this interpreter, stdout and stderr captured as text, killed after
``timeout`` seconds (``subprocess.TimeoutExpired``). ``env`` None inherits
this process's environment as it is at the call; ``stdin`` (a file) and
``input`` (a string) are passed to :func:`subprocess.run` unchanged. It
never checks the exit status: the tests assert on it.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stargz_cli(*args: str, cwd: str = REPO_ROOT, env: dict | None = None, stdin=None,
               input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stargz_tui", *args], cwd=cwd, env=env,
                          stdin=stdin, input=input, capture_output=True, text=True,
                          timeout=timeout)
