"""`mount --record`: a real mount records, in order, each regular file a
real reader process opens (and nothing it only lists, stats or readlinks),
as ctr-remote's record lines; `mounts` shows the count; the list drives
`convert` and `optimize --record-in`."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import anyio
import pytest
from fuse_helpers import FIXTURES, compare_tree, isolated_mount_env, layer_blobs, merged_expected

from core.convert import OCILayoutWriter, convert_image
from core.estargz.toc import PREFETCH_LANDMARK
from core.image import open_image
from core.record import parse_record, read_paths

pytestmark = pytest.mark.fuse
IMAGE = f"oci:{FIXTURES}:mini-esgz"

# A reader that opens three files (one from the upper layer), touches others
# only by name, and opens two again (once through a symlink).
READER = textwrap.dedent("""
    import os, sys
    mp = sys.argv[1]
    p = lambda *a: os.path.join(mp, *a)
    with open(p("etc/os-release"), "rb") as f:
        f.read(1)
    os.stat(p("data/text.txt"))
    os.listdir(p("usr/lib/app"))
    os.readlink(p("data/link-to-os-release"))
    os.access(p("data/random.bin"), os.R_OK)
    with open(p("data/new.txt"), "rb"):
        pass
    for dirpath, dirs, files in os.walk(mp):
        for f in files:
            os.lstat(os.path.join(dirpath, f))
    with open(p("usr/lib/app/mod_03.py"), "rb") as f:
        f.read()
    with open(p("data/link-to-os-release"), "rb") as f:
        f.read()
    with open(p("etc/os-release"), "rb") as f:
        f.read()
""")
EXPECTED = [("etc/os-release", 0), ("data/new.txt", 1), ("usr/lib/app/mod_03.py", 0)]


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _record_and_read(env, rec_file: str, *extra: str) -> str:
    mp = env.mountpoint()
    env.cli("mount", IMAGE, mp, "--record", rec_file, "--no-background-fetch", *extra,
            check=True)
    subprocess.run([sys.executable, "-c", READER, mp], check=True, timeout=60)
    return mp


def test_recording_mount_records_exactly_the_files_opened_in_order(mount_env, tmp_path):
    rec_file = str(tmp_path / "record.json")
    mp = _record_and_read(mount_env, rec_file)
    manifest_digest = mount_env.status(mp)["manifestDigest"]
    lines = [json.loads(line) for line in open(rec_file)]
    assert lines == [{"path": p, "manifestDigest": manifest_digest, "layerIndex": n}
                     for p, n in EXPECTED]
    # the count, live: --json and the text listing
    st = mount_env.status(mp)
    assert st["recorded"] == 3 and st["record"] == rec_file
    r = mount_env.cli("mounts", check=True)
    assert f"3 file(s) recorded to {rec_file}" in r.stdout
    # a new file opened later is appended while the mount lives
    with open(os.path.join(mp, "data/old/c.txt"), "rb"):
        pass
    assert json.loads(open(rec_file).readlines()[-1])["path"] == "data/old/c.txt"
    assert mount_env.status(mp)["recorded"] == 4
    mount_env.cli("unmount", mp, check=True)


def test_one_layer_mount_records_too(mount_env, tmp_path):
    rec_file = str(tmp_path / "record.json")
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, "--layer", "0", "--record", rec_file, check=True)
    with open(os.path.join(mp, "data/hardlink.bin"), "rb") as f:
        f.read(10)
    os.stat(os.path.join(mp, "etc/os-release"))
    # a hardlink is one inode: the kernel opens it by inode, so its target is named
    assert [e.path for e in parse_record(open(rec_file).read())] == ["data/random.bin"]
    assert [e.layer for e in parse_record(open(rec_file).read())] == [0]
    mount_env.cli("unmount", mp, check=True)


def test_bad_record_file_is_one_line(mount_env, tmp_path):
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", IMAGE, mp, "--record", str(tmp_path / "no/such/dir/r.json"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"stargz-tui: cannot write the record file {tmp_path}/no/such/dir/r.json: "
        "No such file or directory"]


def _landmark_prefix(blob: str) -> list[str]:
    """Regular files before the prefetch landmark, in blob order."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(open(blob, "rb").read()))) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert PREFETCH_LANDMARK in names, names[:5]
    return [m.name for m in members[: names.index(PREFETCH_LANDMARK)] if m.isreg()]


def test_record_round_trips_through_convert(mount_env, tmp_path):
    rec_file = str(tmp_path / "record.json")
    mp = _record_and_read(mount_env, rec_file)
    mount_env.cli("unmount", mp, check=True)
    paths = read_paths(rec_file)
    assert paths == [p for p, _ in EXPECTED]
    out = tmp_path / "out"

    async def convert():
        image = await open_image(IMAGE)
        try:
            return await convert_image(image, OCILayoutWriter(str(out)), tag="prio",
                                       prioritized_files=paths)
        finally:
            await image.store.aclose()

    res = anyio.run(convert)
    # every layer gets the whole list (as ctr-remote does); each has its own files first
    blobs = [str(out / "blobs/sha256" / c.digest[7:]) for c in res.layers]
    assert _landmark_prefix(blobs[0]) == ["etc/os-release", "usr/lib/app/mod_03.py"]
    assert _landmark_prefix(blobs[1]) == ["data/new.txt"]
    # and the converted image mounts and equals the source
    mp2 = mount_env.mountpoint("converted")
    mount_env.mount(f"oci:{out}:prio", mp2)
    compare_tree(mp2, merged_expected(layer_blobs("mini-gzip")))


def test_optimize_record_in_keeps_layers_with_nothing_recorded(mount_env, tmp_path):
    rec = tmp_path / "list.json"
    rec.write_text('{"path":"data/new.txt"}\n{"path":"etc/nope.conf"}\n'
                   '{"path":"usr/lib/app/remove-me.py"}\n')
    src = json.loads((FIXTURES / "index.json").read_text())
    out = tmp_path / "out"
    r = mount_env.cli("optimize", IMAGE, f"oci:{out}:opt", "--record-in", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # layer 1 shows data/new.txt; the other two are not files of the merged view
    assert res["prioritized"] == {"1": ["data/new.txt"]}
    assert res["missed"] == ["etc/nope.conf", "usr/lib/app/remove-me.py"]
    assert res["kept"] == [0]
    src_layers = [ld["digest"] for ld in _manifest_layers(FIXTURES, "mini-esgz", src)]
    assert res["layers"][0]["digest"] == src_layers[0]  # byte-identical
    assert res["layers"][1]["digest"] != src_layers[1]
    assert _landmark_prefix(str(out / "blobs/sha256" / res["layers"][1]["digest"][7:])) == [
        "data/new.txt"]
    mp = mount_env.mountpoint("opt")
    mount_env.mount(f"oci:{out}:opt", mp)
    compare_tree(mp, merged_expected(layer_blobs("mini-gzip")))
    r = mount_env.cli("optimize", IMAGE, f"oci:{out}:opt2", "--record-in", str(rec))
    assert "missed: etc/nope.conf (recorded but not a file in the image)" in r.stdout


def _manifest_layers(layout, tag: str, index: dict) -> list[dict]:
    for m in index["manifests"]:
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag:
            return json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())["layers"]
    raise KeyError(tag)


CONTAINERD_CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
"""


@pytest.fixture
def containerd(tmp_path):
    """Debian's containerd on a private socket, root and state (for ctr-remote)."""
    d = tmp_path / "ctd"
    d.mkdir()
    (d / "config.toml").write_text(CONTAINERD_CONFIG.format(d=d))
    sock = d / "containerd.sock"
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), (d / "log").read_text()[-2000:]
        yield ["ctr-remote", "-a", str(sock), "-n", "stargz-tui-test"]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_record_round_trips_through_ctr_remote(mount_env, tmp_path, containerd):
    """Our record file, as upstream's `ctr-remote image convert --estargz-record-in`
    reads it: the converted image has the recorded files first and mounts equal."""
    rec_file = str(tmp_path / "record.json")
    mp = _record_and_read(mount_env, rec_file)
    mount_env.cli("unmount", mp, check=True)
    ctr = containerd

    def run(*args):
        r = subprocess.run([*ctr, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr)

    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        tf.add(FIXTURES, arcname=".")
    run("images", "import", "--no-unpack", "--all-platforms", "--base-name",
        "docker.io/library/fx", str(src))
    run("image", "convert", "--oci", "--estargz", "--estargz-record-in", rec_file,
        "docker.io/library/fx:mini-gzip", "docker.io/library/fx:rec")
    run("images", "export", str(tmp_path / "out.tar"), "docker.io/library/fx:rec")
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(tmp_path / "out.tar") as tf:
        tf.extractall(out)
    layers = _manifest_layers(out, "rec", json.loads((out / "index.json").read_text()))
    blobs = [str(out / "blobs/sha256" / ld["digest"][7:]) for ld in layers]
    assert _landmark_prefix(blobs[0]) == ["etc/os-release", "usr/lib/app/mod_03.py"]
    assert _landmark_prefix(blobs[1]) == ["data/new.txt"]
    mp2 = mount_env.mountpoint("upstream")
    mount_env.mount(f"oci:{out}:rec", mp2)
    compare_tree(mp2, merged_expected(layer_blobs("mini-gzip")))


def test_optimize_record_in_converts_plain_layers_with_what_they_hold(mount_env, tmp_path):
    """Plain gzip layers have no TOC to look paths up in: every path is offered to
    each, the writer keeps what the layer holds, the rest is missed."""
    rec = tmp_path / "list.txt"
    rec.write_text("etc/os-release\ndata/new.txt\nnope/x\n")  # a plain list works too
    out = tmp_path / "out"
    r = mount_env.cli("optimize", f"oci:{FIXTURES}:mini-gzip", f"oci:{out}:opt",
                      "--record-in", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prioritized"] == {"0": ["etc/os-release"], "1": ["data/new.txt"]}
    assert res["missed"] == ["nope/x"] and res["kept"] == []
    blobs = [str(out / "blobs/sha256" / ly["digest"][7:]) for ly in res["layers"]]
    assert _landmark_prefix(blobs[0]) == ["etc/os-release"]
    assert _landmark_prefix(blobs[1]) == ["data/new.txt"]
