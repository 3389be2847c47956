"""`optimize` on a real userland (this host's /bin/sh, cat and their
libraries in a one-layer image): a real command runs chrooted in the lazy
mount, the record holds what it opened, and the new image has exactly those
files before its prefetch landmark; failing and timed-out commands still
give a record; bad input is one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest
from fuse_helpers import FIXTURES, ROOT, isolated_mount_env, walk

from bench.userland import write_userland_layout
from core.estargz.toc import PREFETCH_LANDMARK

pytestmark = pytest.mark.fuse
OS_RELEASE = b'PRETTY_NAME="userland for stargz-tui tests"\n'


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def userland(tmp_path_factory):
    root = tmp_path_factory.mktemp("userland") / "layout"
    return write_userland_layout(
        str(root), programs=["sh", "cat"],
        files={"etc/os-release": OS_RELEASE, "etc/hostname": b"box\n",
               "srv/www/index.html": b"<p>never opened</p>\n" * 100,
               "srv/www/other.html": b"<p>stat only</p>\n"},
        config={"Env": ["PATH=/usr/bin:/bin", "GREETING=from-the-config"],
                "WorkingDir": "/srv/www",
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ['echo "$GREETING in $(pwd)"; cat /etc/os-release']},
        tag="ul")


def _blob(layout: str, digest: str) -> str:
    return os.path.join(layout, "blobs", "sha256", digest.split(":")[1])


def _members(blob: str) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(open(blob, "rb").read()))) as tf:
        return tf.getmembers()


def _before_landmark(blob: str) -> list[str]:
    ms = _members(blob)
    names = [m.name for m in ms]
    assert PREFETCH_LANDMARK in names
    return [m.name for m in ms[: names.index(PREFETCH_LANDMARK)] if m.isreg()]


def _tree_digest(root: str) -> dict:
    out = {}
    for rel, st in walk(root).items():
        if os.path.isfile(os.path.join(root, rel)) and not os.path.islink(os.path.join(root, rel)):
            with open(os.path.join(root, rel), "rb") as f:
                out[rel] = (st.st_mode, hashlib.sha256(f.read()).hexdigest())
        else:
            out[rel] = (st.st_mode, None)
    return out


def test_optimize_runs_a_real_command_and_prioritizes_what_it_opened(mount_env, userland,
                                                                     tmp_path):
    out = tmp_path / "out"
    rec = tmp_path / "rec.json"
    script = ("cat /etc/os-release; test -e /etc/hostname; echo /srv/www/*; "
              "[ -r /srv/www/other.html ] && echo readable")
    r = mount_env.cli("optimize", userland["ref"], f"oci:{out}:opt", "--record-out", str(rec),
                      "--json", "--", "/bin/sh", "-c", script)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # the command really ran in the image: its output is on our stderr
    assert OS_RELEASE.decode() in r.stderr and "readable" in r.stderr
    assert "/srv/www/index.html /srv/www/other.html" in r.stderr
    assert res["run"]["status"] == 0 and not res["run"]["timedOut"]
    recorded = [json.loads(line)["path"] for line in rec.read_text().splitlines()]
    assert res["run"]["recorded"] == len(recorded)
    # what it executed, loaded and read; not what it only stat'ed or listed
    assert recorded[0] == "usr/bin/dash"
    assert {"usr/bin/cat", "etc/os-release"} <= set(recorded)
    assert any(p.endswith("/libc.so.6") for p in recorded)
    assert recorded.index("usr/bin/cat") < recorded.index("etc/os-release")
    assert not {"etc/hostname", "srv/www/index.html", "srv/www/other.html"} & set(recorded)
    # the new layer: exactly the recorded files, in order, then the landmark
    layer = res["layers"][0]
    assert res["prioritized"] == {"0": recorded} and res["missed"] == []
    assert _before_landmark(_blob(str(out), layer["digest"])) == recorded
    # and it mounts and equals the source
    a, b = mount_env.mountpoint("src"), mount_env.mountpoint("dst")
    mount_env.mount(userland["ref"], a)
    mount_env.mount(f"oci:{out}:opt", b)
    assert _tree_digest(b) == _tree_digest(a)


def test_optimize_uses_the_image_config_when_no_command_is_given(mount_env, userland,
                                                                 tmp_path):
    out = tmp_path / "out"
    r = mount_env.cli("optimize", userland["ref"], f"oci:{out}:opt")
    assert r.returncode == 0, r.stderr
    # Entrypoint + Cmd, Env and WorkingDir from the config
    assert "from-the-config in /srv/www" in r.stderr
    assert r.stdout.splitlines()[0].startswith(
        "/bin/sh -c echo \"$GREETING in $(pwd)\"; cat /etc/os-release: exited with status 0")
    assert "layer 0: " in r.stdout and "before the prefetch landmark" in r.stdout


def test_failing_and_timed_out_commands_still_give_a_record(mount_env, userland, tmp_path):
    out = tmp_path / "out"
    r = mount_env.cli("optimize", userland["ref"], f"oci:{out}:fail", "--json", "--",
                      "/bin/sh", "-c", "cat /etc/os-release; exit 3")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["run"]["status"] == 3 and not res["run"]["timedOut"]
    assert "failed with exit status 3" in r.stderr
    assert "etc/os-release" in res["prioritized"]["0"]
    assert _before_landmark(_blob(str(out), res["layers"][0]["digest"])) == \
        res["prioritized"]["0"]

    r = mount_env.cli("optimize", userland["ref"], f"oci:{out}:slow", "--json", "--period",
                      "1.5", "--", "/bin/sh", "-c",
                      "cat /etc/os-release; while :; do :; done")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["run"]["timedOut"] and res["run"]["status"] is None
    assert 1.5 <= res["run"]["seconds"] < 30
    assert "stopped after the" in r.stderr
    assert res["prioritized"]["0"][-1] == "etc/os-release"
    # nothing of the run is left: no mount under the temp dirs, no process in the chroot
    assert not [m for m in open("/proc/self/mountinfo") if "stargz-tui-optimize-" in m]


def test_bad_input_is_one_line(mount_env, userland, tmp_path):
    out = f"oci:{tmp_path / 'out'}:x"
    bare = write_userland_layout(str(tmp_path / "bare"), files={"etc/motd": b"hi\n"},
                                 tag="bare")["ref"]
    cases = [
        ((userland["ref"], out, "--", "nosuchcmd", "-v"),
         f"stargz-tui: command nosuchcmd not found in {userland['ref']}"),
        ((f"oci:{FIXTURES}:mini-esgz", out, "--", "/bin/sh", "-c", "true"),
         f"stargz-tui: oci:{FIXTURES}:mini-esgz has no shell (/bin/sh is not in the image)"),
        ((f"oci:{FIXTURES}:mini-esgz", out),  # its config's Cmd is /bin/sh
         f"stargz-tui: oci:{FIXTURES}:mini-esgz has no shell (/bin/sh is not in the image)"),
        ((bare, out), f"stargz-tui: {bare} has no entrypoint or command in its config; "
                      "give one after --"),
        ((userland["ref"], out, "--record-in", str(tmp_path / "missing.json")),
         f"stargz-tui: cannot read the record file {tmp_path}/missing.json: "
         "No such file or directory"),
    ]
    for argv, line in cases:
        r = mount_env.cli("optimize", *argv)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == [line], argv
    assert not os.path.exists(tmp_path / "out" / "index.json")  # nothing was written
    assert not [m for m in open("/proc/self/mountinfo") if "stargz-tui-optimize-" in m]


def test_a_plain_user_without_user_namespaces_gets_one_line(tmp_path):
    """In a user namespace that maps nobody (so it may not create another),
    the sandbox reports why before running anything, and optimize turns that
    into its one line. (Debian's python3: the venv's may sit under 0700 /root.)"""
    from core.optimize import start_error

    r, w = os.pipe()
    p = subprocess.run(["unshare", "--user", "/usr/bin/python3", "-m", "core.sandbox",
                        "--root", str(tmp_path), "--status-fd", str(w), "--", "/bin/true"],
                       pass_fds=(w,), cwd=ROOT, capture_output=True, text=True, timeout=60)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.read().strip()
    assert p.returncode == 127 and p.stderr == ""
    assert line == "error userns unshare: Operation not permitted"
    assert str(start_error(line[6:], "oci:x:y", ["/bin/true"], "/")) == (
        "cannot run the command as a plain user: user namespaces are not available here "
        "(unshare: Operation not permitted); run optimize as root or use --record-in")
