"""``convert --format zstd:chunked``: containers/storage's current
generation from our writer (core/estargz/zstdwriter.py), checked against the
test-only writer made from containers/storage's source, against the source
tar, by our verify --full and mount, and by Debian's podman pulling it from
the loopback registry and mounting it (``podman image mount``, vfs, root)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pytest
import zstandard
from fixture_truth import blob_path, config, layer_digests
from fuse_helpers import compare_tree, isolated_mount_env, layer_blobs, merged_expected, push_layout
from podman_helpers import Podman
from registry_helpers import FIXTURE_LAYOUT, Registry
from test_zstdchunked_current import holes_tar
from zstdchunked_writer import write_zstdchunked

from core import mount as core_mount
from core.estargz.footer import parse_footer
from core.estargz.zstdchunked import inflate_tar_split, iter_tar_split
from core.estargz.zstdwriter import build_zstdchunked

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


def _tars() -> dict[str, bytes]:
    out = {"holes": holes_tar()}
    for fam in ("mini", "special"):
        for i, d in enumerate(layer_digests(f"{fam}-gzip")):
            out[f"{fam}-{i}"] = gzip.decompress(Path(blob_path(d)).read_bytes())
    return out


def _toc_and_split(blob: bytes) -> tuple[dict, list]:
    f = parse_footer(blob[-72:], len(blob))
    toc = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(
        blob[f.toc_offset:f.toc_offset + f.toc_size]))
    ts = f.tar_split
    split = inflate_tar_split(blob[ts.offset:ts.offset + ts.size], ts.uncompressed_size)
    return toc, [json.loads(line) for line in split.splitlines()]


@pytest.mark.parametrize("name", list(_tars()))
def test_our_writer_writes_what_containers_storage_writes(name):
    tar = _tars()[name]
    ref = write_zstdchunked(tar, chunk_size=64 << 10)
    out = io.BytesIO()
    res = build_zstdchunked(io.BytesIO(tar), out, chunk_size=64 << 10)
    blob = out.getvalue()
    # the whole blob is a zstd stream of the source tar: the diffID holds
    assert zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(blob), read_across_frames=True).read() == tar
    assert res.diff_id == ref.diff_id
    ours_toc, ours_split = _toc_and_split(blob)
    ref_toc, ref_split = _toc_and_split(ref.blob)
    # same entries, chunks and holes (offsets differ with frame encodings:
    # each writer's are checked by reading its blob); same tar-split records
    # (crc64 included)
    def strip(entries):
        return [{k: v for k, v in e.items() if k not in ("offset", "endOffset")} for e in entries]

    assert strip(ours_toc["entries"]) == strip(ref_toc["entries"])
    assert [("offset" in e, "endOffset" in e) for e in ours_toc["entries"]] == \
        [("offset" in e, "endOffset" in e) for e in ref_toc["entries"]]
    assert ours_split == ref_split
    assert set(res.annotations) == set(ref.annotations)
    # and every record of it rebuilds the tar with the files' contents
    items = list(iter_tar_split(b"".join(json.dumps(r).encode() + b"\n" for r in ours_split)))
    assert sum(i.size for i in items) == len(tar)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-zc")
    reg = Registry(str(root / "registry")).start()
    try:
        layout = root / "out"
        r = subprocess.run(
            [__import__("sys").executable, "-m", "stargz_tui", "convert",
             f"oci:{FIXTURE_LAYOUT}:mini-gzip", f"oci:{layout}:mini-zc", "--format",
             "zstd:chunked", "--chunk-size", "64K", "--json"],
            capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).parent.parent))
        assert r.returncode == 0, r.stderr
        reg.result = json.loads(r.stdout)
        push_layout(str(layout), "mini-zc", f"{reg.host}/conv/mini:zc")
        reg.layout = layout
        reg.podman = Podman(str(root / "podman"))
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def test_converted_keeps_diffids_and_verifies(mount_env, converted):
    ref = f"{converted.host}/conv/mini:zc"
    src_diff_ids = config("mini-gzip")["rootfs"]["diff_ids"]
    assert [la["diffID"] for la in converted.result["layers"]] == src_diff_ids
    info = json.loads(mount_env.cli("inspect", ref, "--json", check=True).stdout)
    assert info["diffIDs"] == src_diff_ids
    for la in info["layers"]:
        assert la["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert la["format"] == "zstdchunked" and la["tocDigestVerified"] is True
    r = mount_env.cli("verify", ref, "--full", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    names = [c["name"] for c in json.loads(r.stdout)["checks"] if c["ok"] and not c["skipped"]]
    assert names.count("tar-split") == 2 and names.count("diff-id") == 2 and "chain-id" in names
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp)
    compare_tree(mp, merged_expected(layer_blobs("mini-gzip")),
                 drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)


def test_podman_pulls_and_mounts_the_converted_image(converted):
    pm = converted.podman
    ref = f"{converted.host}/conv/mini:zc"
    image = pm.pull(ref, tls_verify=False)
    root = pm.run("image", "mount", image).strip()
    try:
        compare_tree(root, merged_expected(layer_blobs("mini-gzip")), check_dir_meta=False)
    finally:
        pm.run("image", "unmount", image)
