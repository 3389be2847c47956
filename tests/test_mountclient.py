"""``stargz-tui mount``'s fast client (stargz_tui.mountclient): it reads the
common command lines the way argparse does, hands every other one back to
the full command line, and sends the service the options the full path
would have built, importing neither argparse nor msgspec on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import pytest
from fuse_helpers import compare_tree, family, layer_blobs, raw_expected
from test_service import svc_env  # noqa: F401 - the fixture (private dirs, the service stopped after)

from core import mount as core_mount
from core.optionfields import mount_fields
from core.options import MountOptions, Tuning
from stargz_tui import mountclient
from stargz_tui.cli import build_parser
from stargz_tui.commands.mount import mount_options
from stargz_tui.mountargs import MOUNT_FLAGS, fields_from

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "mini-esgz"

# a value each kind of flag accepts, and how argparse and the fast parser must read it
SAMPLE = {"text": "2", "size": "64M", "seconds": "2.5", "append": "0:1000:1"}


def _full(argv: list[str]) -> dict:
    args = build_parser("mount").parse_args(["mount", *argv])
    return msgspec.to_builtins(mount_options(args))


def _fast(argv: list[str]) -> dict | None:
    values = mountclient.parse(argv)
    if values is None:
        return None
    fields = mount_fields(values["image"], values["mountpoint"], **fields_from(values))
    # what the service does with the JSON it receives: the same struct
    sent = json.loads(json.dumps({"options": fields}))["options"]
    return msgspec.to_builtins(msgspec.convert({**sent, "tuning": {}}, MountOptions))


def _command_lines() -> list[list[str]]:
    lines = [["reg.example/app:1", "mnt"], ["oci:layout:tag", "/abs/mp"]]
    for flag in MOUNT_FLAGS:
        if flag.field is None:
            continue
        if flag.kind in ("true", "false"):
            lines.append(["img", "mp", flag.name])
        else:
            lines.append(["img", flag.name, SAMPLE[flag.kind], "mp"])  # options between
            lines.append(["img", "mp", f"{flag.name}={SAMPLE[flag.kind]}"])
    lines.append(["img", "mp", "--uid-map", "0:1000:1", "--uid-map", "1:100000:65536",
                  "--cache-dir", "~/c", "--record", "../rec.json", "--no-prefetch", "--layer",
                  "sha256:" + "a" * 64])
    return lines


@pytest.mark.parametrize("argv", _command_lines(), ids=lambda a: " ".join(a))
def test_fast_parser_builds_the_options_argparse_builds(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("STARGZ_TUI_")]:
        monkeypatch.delenv(k)
    assert _fast(argv) == _full(argv)


@pytest.mark.parametrize("argv", [
    ["img", "mp", "--help"], ["-h"], ["img", "mp", "--lay", "0"],  # argparse's abbreviations
    ["img", "mp", "--foreground"], ["img", "mp", "--insecure-registry", "h:5000"],
    ["img", "mp", "--timeout", "5"], ["img", "mp", "--cache-size", "lots"],
    ["img", "mp", "--read-timeout", "-1"], ["img"], ["img", "mp", "extra"],
    ["img", "mp", "--layer"], ["img", "mp", "--debug=yes"], ["img", "--", "mp"],
])
def test_fast_parser_hands_everything_else_to_argparse(argv):
    assert mountclient.parse(argv) is None


def test_no_tuning_in_the_environment_is_the_default_tuning():
    """The fast client leaves ``tuning`` out when no STARGZ_TUI_* knob is set
    (and hands the command to the full path when one is): that must be what
    the full path sends too."""
    assert Tuning.from_env({}) == Tuning()
    env = {"STARGZ_TUI_FUSE_SPIN_US": "0"}
    assert Tuning.from_env(env) != Tuning()


def test_a_tuning_variable_or_server_off_takes_the_full_path(monkeypatch, tmp_path):
    monkeypatch.setenv("STARGZ_TUI_RUNTIME_DIR", str(tmp_path))  # no service there anyway
    monkeypatch.setenv("STARGZ_TUI_MEMORY_CACHE", "64M")
    assert mountclient.run(["img", "mp"]) is None
    monkeypatch.delenv("STARGZ_TUI_MEMORY_CACHE")
    monkeypatch.setenv("STARGZ_TUI_SERVER", "off")
    assert mountclient.run(["img", "mp"]) is None
    monkeypatch.setenv("STARGZ_TUI_SERVER", "use")
    assert mountclient.run(["img", "mp"]) is None  # no socket: the full path says so


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.fuse
@pytest.mark.registry
@pytest.mark.usefixtures("svc_env")
def test_mount_through_the_service_imports_neither_argparse_nor_msgspec(registry, tmp_path):
    run = dict(cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "stargz_tui", "service", "start"], **run)
    assert r.returncode == 0, r.stderr
    (tmp_path / "mp").mkdir()
    argv = [registry.ref(TAG), "mp", "--layer", "0", "--cache-size", "512M", "--no-prefetch"]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "stargz_tui", "mount", *argv],
                       **run)
    assert r.returncode == 0, r.stderr
    assert "supervised by the mount service" in r.stdout
    mods = _imported(r.stderr)
    assert "stargz_tui.mountclient" in mods
    assert not {"argparse", "msgspec", "core.options", "stargz_tui.cli"} & mods
    mp = str(tmp_path / "mp")
    compare_tree(mp, raw_expected(layer_blobs(f"{family(TAG)}-gzip")[0]))
    # the service got what the full command line would have sent
    (rec,) = [x for x in core_mount.read_records() if x["mountpoint"] == os.path.realpath(mp)]
    sent = dict(rec["mountOptions"])
    monkey_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        full = _full(argv)
    finally:
        os.chdir(monkey_cwd)
    assert sent == json.loads(json.dumps(full))
    # a refusal after the request went out: one line, exit 1
    (tmp_path / "mp2").mkdir()
    r = subprocess.run([sys.executable, "-m", "stargz_tui", "mount", registry.ref("no-such-tag"),
                        "mp2"], **run)
    assert r.returncode == 1 and r.stderr.startswith("stargz-tui: "), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "stargz_tui", "unmount", mp], **run)
    assert r.returncode == 0, r.stderr
