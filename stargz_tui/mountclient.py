"""``stargz-tui mount`` through a running mount service, without argparse or msgspec.

A mount through the resident service is the command people time (B1:
stargz-snapshotter's daemon is resident too), and most of a fresh
interpreter's work for it would be imports: argparse, the command module,
msgspec. This module does the common case with the standard library.

Contract: :func:`run` takes ``mount``'s arguments and returns the exit
status when it did the whole command, or None when the full command line
(argparse and :mod:`stargz_tui.commands.mount`) must run it instead:
``--help``, a flag or value :data:`stargz_tui.mountargs.MOUNT_FLAGS` does
not read (abbreviations, registry flags, ``--foreground``), ``STARGZ_TUI_SERVER=off``,
a tuning variable in the environment (only the full path reads them, into
``core.options.Tuning``), or no service of ours answering (the full path
then starts one, or mounts in-process). It never decides differently from
the full path: the flags come from the same table
(:func:`stargz_tui.mountargs.fields_from`), the fields are normalized by
the same function (:func:`core.optionfields.mount_fields`), and the service
validates the JSON it sends into the same :class:`core.options.MountOptions`
(unknown fields refused). Once a request is sent, its reply is the answer:
a refusal is one line on stderr and exit status 1, as in the full path.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from core.optionfields import DEFAULT_READY_TIMEOUT, mount_fields
from core.paths import runtime_socket
from core.peer import is_own_peer
from core.service import wire

from .mountargs import MOUNT_FLAGS, fields_from, positive_seconds

# STARGZ_TUI_* variables that choose where things are (read below the edge
# by core.paths and the service) or whether to use the service: any other
# one is a tuning knob, which only the full path reads.
LOCATION_VARIABLES = frozenset({
    "STARGZ_TUI_SERVER", "STARGZ_TUI_RUNTIME_DIR", "STARGZ_TUI_STATE_DIR",
    "STARGZ_TUI_CACHE_DIR", "STARGZ_TUI_CONFIG_DIR", "STARGZ_TUI_REGISTRIES_CONFIG"})
UNVERIFIED_WARNING = "stargz-tui: warning: layers without a TOC digest are mounted unverified"
_FLAGS = {f.name: f for f in MOUNT_FLAGS}


def parse(argv: list[str]) -> dict | None:
    """``mount``'s arguments as {dest: value} (what argparse would give),
    or None when this parser does not read them all."""
    values: dict = {}
    positionals: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        name, eq, value = arg.partition("=")
        flag = _FLAGS.get(name)
        if flag is None or flag.field is None:
            return None  # --help, -h, --, abbreviations, --foreground, registry flags
        if flag.kind in ("true", "false"):
            if eq:
                return None
            values[flag.dest] = True
            continue
        if not eq:
            value = next(args, None)
            if value is None:
                return None
        try:
            if flag.kind == "size":
                from core.units import parse_size

                values[flag.dest] = parse_size(value)
            elif flag.kind == "seconds":
                values[flag.dest] = positive_seconds(value)
            elif flag.kind == "append":
                values.setdefault(flag.dest, []).append(value)
            else:
                values[flag.dest] = value
        except ValueError:
            return None  # argparse says what is wrong with it
    if len(positionals) != 2:
        return None
    values["image"], values["mountpoint"] = positionals
    return values


def _connect() -> socket.socket | None:
    path = runtime_socket(wire.SOCKET_NAME)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5.0)
        s.connect(path)
        if is_own_peer(s):
            return s
    except OSError:
        pass
    s.close()  # nobody, or not us: the full path starts one or says why not
    return None


def run(argv: list[str]) -> int | None:
    """Do ``stargz-tui mount ARGV`` through the running service (module docs)."""
    if (os.environ.get("STARGZ_TUI_SERVER") or "auto").strip().lower() == "off":
        return None
    if any(k.startswith("STARGZ_TUI_") and k not in LOCATION_VARIABLES for k in os.environ):
        return None
    values = parse(argv)
    if values is None:
        return None
    try:
        fields = mount_fields(values["image"], values["mountpoint"], **fields_from(values))
    except Exception:  # noqa: BLE001 - e.g. a bad oci: reference: the full path says why
        return None
    sock = _connect()
    if sock is None:
        return None
    request = {"v": wire.VERSION, "op": "mount", "options": fields}
    try:
        with sock:
            sock.settimeout(DEFAULT_READY_TIMEOUT + 60)
            sock.sendall(wire.frame_body(json.dumps(request).encode()))
            reply = json.loads(wire.read_frame(sock))
    except (OSError, EOFError, ValueError) as e:
        return _fail(f"the mount service did not answer: {getattr(e, 'strerror', None) or e}")
    except KeyboardInterrupt:
        print("stargz-tui: interrupted", file=sys.stderr)
        return 130
    if not isinstance(reply, dict) or not reply.get("ok", True):
        return _fail(reply.get("error") if isinstance(reply, dict) else None)
    rec = reply.get("data")
    if fields.get("allow_unverified"):
        print(UNVERIFIED_WARNING, file=sys.stderr)
    print(mounted_line(rec, supervised=True))
    return 0


def _fail(message: str | None) -> int:
    from .textsafe import safe

    print(f"stargz-tui: {safe(message or 'the mount service failed')}", file=sys.stderr)
    return 1


def mounted_line(rec: dict, supervised: bool) -> str:
    """What ``stargz-tui mount`` prints once the mount is served."""
    from core.units import plural

    from .textsafe import safe

    what = f"layer {rec['layers'][0]['index']}" if rec["kind"] == "layer" else \
        f"{plural(len(rec['layers']), 'layer')} merged"
    # a merged mount's layers share one daemon: each pid once
    pids = ", ".join(str(p) for p in dict.fromkeys(e["pid"] for e in rec["layers"]))
    return (f"mounted {safe(rec['image'])} ({what}) at {safe(rec['mountpoint'])} "
            f"[daemon pid {pids}{', supervised by the mount service' if supervised else ''}]")
