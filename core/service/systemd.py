"""The systemd user unit that runs the mount service at login.

Contract: :func:`unit_path` is ``$XDG_CONFIG_HOME/systemd/user/stargz-tui.service``
(``~/.config/...`` by default); :func:`unit_text` runs this interpreter's
``-m core.service run``. ``KillMode=process``: stopping the unit stops the
service only, never the layer daemons it forked (they share its cgroup, and
mounts must not depend on the service). At start the service restores the
recorded mounts, so enabling the unit brings them back after a reboot.
:func:`install` writes it (and asks systemd to reload, when there is one),
:func:`uninstall` removes it; both return a one-line account.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

UNIT_NAME = "stargz-tui.service"


def unit_path() -> str:
    from ..paths import config_home

    return os.path.join(config_home(), "systemd", "user", UNIT_NAME)


def unit_text() -> str:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return f"""[Unit]
Description=stargz-tui mount service (lazily pulled image mounts, restored at login)
Documentation=file://{pkg_parent}/README.md

[Service]
Type=simple
ExecStart={sys.executable} -m core.service run
Environment=PYTHONPATH={pkg_parent}
# stopping the service must leave the mounts' daemons serving
KillMode=process
Restart=on-failure
RestartSec=2

[Install]
WantedBy=default.target
"""


def _systemctl(*args: str) -> bool:
    exe = shutil.which("systemctl")
    if not exe:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([exe, "--user", *args], capture_output=True, timeout=30).returncode == 0
    return False


def install() -> str:
    path = unit_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(unit_text())
    os.replace(tmp, path)
    _systemctl("daemon-reload")
    return (f"wrote {path}; enable it with `systemctl --user enable --now "
            f"{UNIT_NAME.removesuffix('.service')}`")


def uninstall() -> str:
    path = unit_path()
    if not os.path.exists(path):
        return f"no unit at {path}"
    _systemctl("disable", "--now", UNIT_NAME)
    os.unlink(path)
    _systemctl("daemon-reload")
    return f"removed {path} (the mounts keep serving)"


__all__ = ["unit_path", "unit_text", "install", "uninstall", "UNIT_NAME"]
