"""Where stargz-tui keeps per-user state (mount records, logs) and runtime
files (control sockets, the mount service's socket).

Every directory handed out is a real directory (never a symlink), owned by
our uid and 0700: it is opened with ``O_NOFOLLOW`` and checked and tightened
through that descriptor (``fstat``/``fchmod``), so a link planted where it
should be is never followed, and nothing of someone else's is chmodded.

Without ``$STARGZ_TUI_RUNTIME_DIR`` and ``$XDG_RUNTIME_DIR`` (as under
``sudo``) the runtime dir is ``$TMPDIR|/tmp/stargz-tui-$UID``: a name in a
shared directory that another local user may have taken first (a symlink, a
directory of theirs) or could swap (a world-writable parent without the
sticky bit). Then, instead of failing, we use a fresh private directory made
under /tmp with an unguessable name (``mkdtemp``-style, ``mkdir`` of a new
name, so nobody can have planted it) and record its name in the state dir
(``runtime-dir``), which is under our home and only ours: every later process
(the CLI, the mount service, a mount, ``mounts``) reads the same
record and agrees on it, and the record is replaced when the directory it
names is gone or no longer safe. Only these fallback locations get an
alternative; a directory named by ``$STARGZ_TUI_RUNTIME_DIR``, the state dir
or a cache dir that is unsafe is refused with one line, since the user chose it.

This module and :mod:`core.options` are the only places in ``core`` that
read the environment (``tests/test_env_edge.py`` holds it): here, where
things live (state, runtime and cache dirs, the registries config, the
credential files of podman and docker, the systemd user dir: the XDG and
tool conventions); there, the tuning knobs. Every other module is handed
what it needs.

Kept free of heavy imports: the mount service client reads the runtime
directory before it decides whether to import anything else.
"""

from __future__ import annotations

import os
import stat

from .errors import MountError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RUNTIME_RECORD = "runtime-dir"


class UnsafeDirError(MountError):
    """A directory we would use is a link, not a directory, or someone else's."""


def private_dir(path: str) -> str:
    """Create ``path`` (0700) if needed and return it; refuse (one line,
    :class:`UnsafeDirError`) a symlink, a non-directory or a directory owned
    by another uid. A directory of ours with group/other bits is fchmodded
    to 0700 through an ``O_NOFOLLOW`` descriptor."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        try:
            st = os.lstat(path)
        except OSError:
            raise UnsafeDirError(f"cannot use {path}: {e.strerror}") from None
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirError(f"{path} is {what}; refusing to use it") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeDirError(f"{path} is owned by uid {st.st_uid}, not us; "
                                 "refusing to use it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def state_dir() -> str:
    env = os.environ.get("STARGZ_TUI_STATE_DIR")
    if env:
        return private_dir(env)
    import platformdirs

    return private_dir(platformdirs.user_state_dir("stargz-tui"))


def cache_dir() -> str:
    """``$STARGZ_TUI_CACHE_DIR`` or the platform's user cache dir (not
    created here: the chunk cache makes it and checks it)."""
    env = os.environ.get("STARGZ_TUI_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("stargz-tui")


def config_home() -> str:
    """``$XDG_CONFIG_HOME`` or ``~/.config``."""
    return os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")


def registries_config_file(env_var: str) -> str:
    """The registries config: ``$<env_var>`` or ``registries.toml`` in the
    platform's user config dir."""
    env = os.environ.get(env_var)
    if env:
        return env
    import platformdirs

    return os.path.join(platformdirs.user_config_dir("stargz-tui"), "registries.toml")


def containers_auth_files() -> list[str]:
    """podman/skopeo's credential files, in their order: ``$REGISTRY_AUTH_FILE``,
    ``$XDG_RUNTIME_DIR/containers/auth.json``, ``<config home>/containers/auth.json``."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(os.path.join(config_home(), "containers", "auth.json"))
    return files


def docker_config_file() -> str:
    """docker's ``config.json``: in ``$DOCKER_CONFIG`` or ``~/.docker``."""
    d = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(d, "config.json")


def runtime_dir() -> str:
    env = os.environ.get("STARGZ_TUI_RUNTIME_DIR")
    if env:
        return private_dir(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return private_dir(os.path.join(xdg, "stargz-tui"))
    return _shared_tmp_dir(os.path.join(_temp_dir(), f"stargz-tui-{os.getuid()}"))


def _temp_dir() -> str:
    """``$TMPDIR`` (or ``$TEMP``, ``$TMP``) when it is a directory, else /tmp:
    what ``tempfile.gettempdir()`` finds on Linux, without importing
    ``tempfile`` (and ``shutil``, ``random``...) on the client's path."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        d = os.environ.get(var)
        if d and os.path.isdir(d):
            return os.path.abspath(d)
    return "/tmp"


def _swappable_parent(path: str) -> bool:
    """Can other users rename or replace entries of ``path``'s parent? (world-
    or group-writable without the sticky bit, or owned by another user but root)."""
    try:
        st = os.stat(os.path.dirname(path) or "/")
    except OSError:
        return True
    if st.st_uid not in (0, os.getuid()):
        return True
    return bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX


def _shared_tmp_dir(path: str) -> str:
    """``path`` (a fixed name in a shared temp dir) when it is safe to use,
    else our recorded alternative (see the module docs)."""
    if not _swappable_parent(path):
        try:
            return private_dir(path)
        except UnsafeDirError:
            pass
    return _alternative_dir()


def _alternative_dir() -> str:
    """A private directory under /tmp with a random name, recorded in the
    state dir and reused while it stays ours."""
    record = os.path.join(state_dir(), RUNTIME_RECORD)
    try:
        with open(record) as f:
            known = f.read().strip()
    except OSError:
        known = ""
    if known.startswith("/tmp/stargz-tui-") and "/" not in known[5:] \
            and os.path.lexists(known):
        try:
            return private_dir(known)
        except UnsafeDirError:
            pass
    if _swappable_parent("/tmp/x"):
        raise UnsafeDirError("no safe runtime directory: /tmp is writable by others without "
                             "the sticky bit; set STARGZ_TUI_RUNTIME_DIR or XDG_RUNTIME_DIR")
    for _ in range(100):
        path = f"/tmp/stargz-tui-{os.getuid()}-{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        private_dir(path)  # checks what mkdir made (and the umask's bits)
        tmp = f"{record}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, (path + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, record)
        return path
    raise UnsafeDirError("cannot create a private runtime directory under /tmp")


def runtime_socket(name: str) -> str:
    """A Unix socket path ``name`` in :func:`runtime_dir`, or in a short
    private dir under /tmp when that path would not fit ``sun_path``."""
    path = os.path.join(runtime_dir(), name)
    if len(path.encode()) > 100:  # sun_path limit
        path = os.path.join(_shared_tmp_dir(f"/tmp/sgz-{os.getuid()}"), name)
    return path
