"""Id mapping (issue 13): an image giving root 0600/0700 files, mounted by a
plain user. Without mapping its ids and modes are exact and root's files
answer EACCES; with ``--map-owner`` every file is readable and root's show
her ids (the image's other ids through her /etc/subuid, /etc/subgid
ranges); ``--uid-map``/``--gid-map`` take explicit ranges."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

import pytest
from plainuser_support import subordinate_range

from core.estargz.writer import build_estargz

pytestmark = pytest.mark.fuse

MTIME = 1700000000
# (name, type, mode, uid, gid, data) per layer, bottom first
LAYERS = [
    [("root", "dir", 0o700, 0, 0, None),
     ("root/secret", "reg", 0o600, 0, 0, b"root's secret\n"),
     ("etc", "dir", 0o755, 0, 0, None),
     ("etc/shadow", "reg", 0o640, 0, 42, b"root:*:19000:0:99999:7:::\n"),
     ("etc/hostname", "reg", 0o644, 0, 0, b"box\n"),
     ("var", "dir", 0o755, 0, 0, None),
     ("var/lib", "dir", 0o700, 0, 0, None),
     ("var/lib/app", "dir", 0o755, 100, 101, None),
     ("var/lib/app/state", "reg", 0o644, 100, 101, b"app state\n" * 1000),
     ("usr", "dir", 0o755, 0, 0, None),
     ("usr/bin", "dir", 0o755, 0, 0, None),
     ("usr/bin/tool", "reg", 0o700, 0, 0, os.urandom(300000))],
    [("root", "dir", 0o700, 0, 0, None),
     ("root/.bashrc", "reg", 0o600, 0, 0, b"umask 077\n"),
     ("etc", "dir", 0o755, 0, 0, None),
     ("etc/shadow", "reg", 0o600, 0, 0, b"root:!:19001:0:99999:7:::\n")],
]


@pytest.fixture(scope="module")
def root_image():
    """An OCI layout of two eStargz layers (built with core.estargz.writer)
    plus the source tars, in a directory plain users can read."""
    d = tempfile.mkdtemp(prefix="stargz-tui-idmap-", dir="/var/tmp")
    os.chmod(d, 0o755)
    blobs = os.path.join(d, "blobs", "sha256")
    os.makedirs(blobs)
    tars, descs, diff_ids = [], [], []
    for n, entries in enumerate(LAYERS):
        tar_path = os.path.join(d, f"layer{n}.tar")
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, typ, mode, uid, gid, data in entries:
                ti = tarfile.TarInfo(name)
                ti.type = tarfile.DIRTYPE if typ == "dir" else tarfile.REGTYPE
                ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, MTIME
                ti.size = len(data or b"")
                tf.addfile(ti, io.BytesIO(data) if data else None)
        tmp = os.path.join(d, "blob.tmp")
        res = build_estargz(tar_path, tmp, chunk_size=64 << 10)
        os.replace(tmp, os.path.join(blobs, res.blob_digest[7:]))
        tars.append(tar_path)
        diff_ids.append(res.diff_id)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": res.blob_digest, "size": res.blob_size,
                      "annotations": res.annotations()})

    def put(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj).encode()
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, h), "wb") as f:
            f.write(data)
        return "sha256:" + h, len(data)

    cfg, cfg_n = put({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    man, man_n = put({"schemaVersion": 2,
                      "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": cfg, "size": cfg_n}, "layers": descs})
    with open(os.path.join(d, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man,
             "size": man_n, "annotations": {"org.opencontainers.image.ref.name": "rooty"}}]}, f)
    os.system(f"chmod -R a+rX {d}")  # noqa: S605 - our own temp dir
    try:
        yield {"ref": f"oci:{d}:rooty", "truth": ",".join(tars)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _mount_check(alice, image, layer: str, args=(), uid_map=(), gid_map=()) -> dict:
    mp = alice.mkdir(f"mnt-idmap-{layer}")
    extra = [] if layer == "merged" else ["--layer", layer]
    r = alice.cli("mount", image["ref"], mp, *extra, *args)
    assert r.returncode == 0, r.stderr
    try:
        return alice.check_tree(mp, image["truth"] if layer == "merged" else
                                image["truth"].split(",")[int(layer)], "merged"
                                if layer == "merged" else "0", uid_map, gid_map)
    finally:
        alice.cli("unmount", mp, check=True)


def test_unmapped_ids_are_exact_and_root_files_denied(alice, root_image):
    res = _mount_check(alice, root_image, "merged")
    assert res["problems"] == [], "\n".join(res["problems"])
    assert res["denied"] == ["etc/shadow", "root", "usr/bin/tool", "var/lib"]
    res = _mount_check(alice, root_image, "0")
    assert res["problems"] == [], "\n".join(res["problems"])
    assert res["denied"] == ["etc/shadow", "root", "usr/bin/tool", "var/lib"]


def test_map_owner_makes_root_files_hers(alice, root_image):
    sub_u = subordinate_range("/etc/subuid", alice.name)
    sub_g = subordinate_range("/etc/subgid", alice.name)
    assert sub_u and sub_g  # ensure_user gave her ranges
    uid_map = [f"0:{alice.uid}:1", f"1:{sub_u[0]}:{sub_u[1]}"]
    gid_map = [f"0:{alice.gid}:1", f"1:{sub_g[0]}:{sub_g[1]}"]
    for layer in ("merged", "0", "1"):
        truth = dict(root_image)
        res = _mount_check(alice, truth, layer, ["--map-owner"], uid_map, gid_map)
        assert res["problems"] == [], f"{layer}: " + "\n".join(res["problems"])
        assert res["denied"] == [] and res["files"] > 0
    mp = alice.mkdir("mnt-idmap-show")
    alice.cli("mount", root_image["ref"], mp, "--map-owner", check=True)
    r = alice.run(["stat", "-c", "%u:%g %a %n", f"{mp}/root/secret", f"{mp}/etc/shadow",
                   f"{mp}/var/lib/app/state"])
    assert r.stdout.split("\n")[:3] == [
        f"{alice.uid}:{alice.gid} 600 {mp}/root/secret",
        f"{alice.uid}:{alice.gid} 600 {mp}/etc/shadow",
        f"{sub_u[0] + 99}:{sub_g[0] + 100} 644 {mp}/var/lib/app/state"]
    assert alice.run(["cat", f"{mp}/root/secret"]).stdout == "root's secret\n"
    alice.cli("unmount", mp, check=True)


def test_explicit_uid_gid_maps(alice, root_image):
    uid_map = [f"0:{alice.uid}:1", f"100:{alice.uid}:1"]
    gid_map = [f"42:{alice.gid}:1"]
    args = [a for m in uid_map for a in ("--uid-map", m)] + ["--gid-map", gid_map[0]]
    res = _mount_check(alice, root_image, "0", args, uid_map, gid_map)
    assert res["problems"] == [], "\n".join(res["problems"])
    assert res["denied"] == []


def test_map_owner_without_subordinate_ranges_leaves_other_ids(tmp_path):
    """--map-owner for a user /etc/subuid does not list: only 0 moves."""
    from core.idmap import IdMapper, owner_mapping

    subuid = tmp_path / "subuid"
    subuid.write_text("someone-else:100000:65536\n")
    uids, gids = owner_mapping(4321, 8765, subuid=str(subuid), subgid=str(subuid))
    m = IdMapper(uids, gids)
    assert [str(r) for r in uids] == ["0:4321:1"] and [str(r) for r in gids] == ["0:8765:1"]
    assert (m.uid(0), m.gid(0), m.uid(1000), m.gid(42)) == (4321, 8765, 1000, 42)
    subuid.write_text("4321:200000:1000\n")  # listed by uid: ids 1..1000 move, 1001 stays
    uids, _ = owner_mapping(4321, 8765, subuid=str(subuid), subgid=str(subuid))
    m = IdMapper(uids, ())
    assert (m.uid(1), m.uid(1000), m.uid(1001)) == (200000, 200999, 1001)
