"""Where stargz-tui keeps per-user state (mount records, logs) and runtime
files (control sockets, the resident server's socket).

Kept free of heavy imports: the ``stargz-tui`` launcher reads the runtime
directory before it decides whether to import anything else.
"""

from __future__ import annotations

import os

from .errors import MountError


def private_dir(path: str) -> str:
    """Create ``path`` (0700) if needed; refuse one owned by another user."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise MountError(f"{path} is owned by uid {st.st_uid}, not us; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def state_dir() -> str:
    env = os.environ.get("STARGZ_TUI_STATE_DIR")
    if env:
        return private_dir(env)
    import platformdirs

    return private_dir(platformdirs.user_state_dir("stargz-tui"))


def runtime_dir() -> str:
    env = os.environ.get("STARGZ_TUI_RUNTIME_DIR")
    if env:
        return private_dir(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return private_dir(os.path.join(xdg, "stargz-tui"))
    return private_dir(os.path.join(_temp_dir(), f"stargz-tui-{os.getuid()}"))


def _temp_dir() -> str:
    """``$TMPDIR`` (or ``$TEMP``, ``$TMP``) when it is a directory, else /tmp:
    what ``tempfile.gettempdir()`` finds on Linux, without importing
    ``tempfile`` (and ``shutil``, ``random``...) on the launcher's path."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        d = os.environ.get(var)
        if d and os.path.isdir(d):
            return os.path.abspath(d)
    return "/tmp"


def runtime_socket(name: str) -> str:
    """A Unix socket path ``name`` in :func:`runtime_dir`, or in a short
    private dir under /tmp when that path would not fit ``sun_path``."""
    path = os.path.join(runtime_dir(), name)
    if len(path.encode()) > 100:  # sun_path limit
        path = os.path.join(private_dir(f"/tmp/sgz-{os.getuid()}"), name)
    return path
