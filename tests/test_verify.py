"""Verification: corrupted chunks, wrong annotations and diffIDs are caught
with clear messages; progress and cancellation of core.verify."""

from __future__ import annotations

import hashlib
import json
import shutil

import anyio
import pytest
from fixture_truth import LAYOUT, blob_path, cli, config, merge, ref, truth_layers

from core.estargz import load_layer_index
from core.image import open_image
from core.source import LocalBlobSource
from core.verify import chain_ids, verify_image


def _copy(tmp_path) -> str:
    dst = str(tmp_path / "layout")
    shutil.copytree(LAYOUT, dst)
    return dst


def _rewrite(layout: str, tag: str, *, manifest_fn=None, config_fn=None) -> None:
    """Edit a tag's manifest/config in a copied layout, keeping digests consistent."""
    with open(f"{layout}/index.json") as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    with open(blob_path(desc["digest"], layout)) as f:
        manifest = json.load(f)

    def put(doc) -> tuple[str, int]:
        data = json.dumps(doc).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(blob_path(digest, layout), "wb") as f:
            f.write(data)
        return digest, len(data)

    if config_fn:
        with open(blob_path(manifest["config"]["digest"], layout)) as f:
            cfg = json.load(f)
        config_fn(cfg)
        manifest["config"]["digest"], manifest["config"]["size"] = put(cfg)
    if manifest_fn:
        manifest_fn(manifest)
    desc["digest"], desc["size"] = put(manifest)
    with open(f"{layout}/index.json", "w") as f:
        json.dump(index, f)


def _corrupt_chunk(layout: str, tag: str, path: str, layer: int = 0, which: int = 1):
    """Flip one byte in the middle of the compressed extent of a file's chunk."""
    with open(f"{layout}/index.json") as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    with open(blob_path(desc["digest"], layout)) as f:
        ld = json.load(f)["layers"][layer]
    bp = blob_path(ld["digest"], layout)

    async def find():
        ix = await load_layer_index(LocalBlobSource(bp, ld["digest"]))
        return ix.chunks(ix.lookup(path))[which]

    c = anyio.run(find)
    pos = c.offset + (c.end - c.offset) // 2
    with open(bp, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x55]))
    return c


@pytest.mark.parametrize("tag", ["mini-esgz-64k", "mini-zstdchunked", "mini-esgz"])
def test_corrupt_chunk_fails_cat_and_full_verify_other_files_read(tmp_path, tag):
    layout = _copy(tmp_path)
    which = 1 if tag.endswith("64k") else 0
    _corrupt_chunk(layout, tag, "data/random.bin", which=which)
    image = ref(tag, layout)
    p = cli("cat", image, "data/random.bin", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "data/random.bin" in err, err
    # The hardlink to it fails too; other files still read.
    assert cli("cat", image, "data/hardlink.bin", check=False).returncode == 1
    truth = merge(truth_layers(tag))
    for other in ("data/text.txt", "etc/os-release", "usr/lib/app/mod_01.py", "data/new.txt"):
        assert cli("cat", image, other).stdout == truth[other]["data"], other
    # The TOC is intact: the quick verify holds, --full does not.
    assert cli("verify", image).returncode == 0
    p = cli("verify", image, "--full", check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert all(line.startswith(("stargz-tui: FAILED layer 0: ", "stargz-tui: FAILED chain-id"))
               for line in lines), lines
    assert any("chunk" in line and "data/random.bin" in line for line in lines), lines
    assert any("blob digest mismatch" in line for line in lines), lines
    assert not any("layer 1" in line for line in lines)
    assert "Traceback" not in p.stderr.decode()


def test_toc_digest_annotation_mismatch(tmp_path):
    layout = _copy(tmp_path)
    wrong = "sha256:" + "ab" * 32

    def edit(m):
        m["layers"][1]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] = wrong

    _rewrite(layout, "mini-esgz", manifest_fn=edit)
    image = ref("mini-esgz", layout)
    p = cli("verify", image, check=False)
    assert p.returncode == 1
    (line,) = p.stderr.decode().strip().splitlines()
    assert "layer 1" in line and "TOC digest mismatch" in line and wrong in line
    p = cli("inspect", image, "--json", check=False)
    assert p.returncode == 1
    layers = json.loads(p.stdout)["layers"]
    assert layers[1]["tocDigestVerified"] is False and layers[0]["tocDigestVerified"] is True
    assert layers[1]["tocDigestAnnotated"] == wrong


def test_diff_id_mismatch_and_chain_ids(tmp_path):
    layout = _copy(tmp_path)
    wrong = "sha256:" + "cd" * 32

    def edit(cfg):
        cfg["rootfs"]["diff_ids"][0] = wrong

    _rewrite(layout, "special-gzip", config_fn=edit)
    p = cli("verify", ref("special-gzip", layout), "--full", check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert any("diffID mismatch" in line and wrong in line for line in lines), lines
    assert any("chain-id" in line for line in lines), lines


def test_chain_ids_follow_the_oci_definition():
    diff_ids = config("mini-esgz")["rootfs"]["diff_ids"]
    c = chain_ids(diff_ids)
    assert c[0] == diff_ids[0]
    want = "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    assert c[1] == want


def test_verify_api_reports_progress_and_results():
    seen = []

    async def main():
        image = await open_image(ref("mini-esgz-64k"))
        return await verify_image(image, full=True, progress=seen.append)

    result = anyio.run(main)
    assert result.ok and not result.failures
    assert result.diff_ids == dict(enumerate(config("mini-esgz-64k")["rootfs"]["diff_ids"]))
    assert result.chain_ids == chain_ids(config("mini-esgz-64k")["rootfs"]["diff_ids"])
    names = {(c.layer, c.name) for c in result.checks}
    assert {(0, "toc-digest"), (0, "chunks"), (0, "files"), (0, "blob-digest"),
            (0, "diff-id"), (1, "diff-id"), (None, "chain-id")} <= names
    blob = [p for p in seen if p.stage == "blob" and p.layer == 0]
    assert blob and blob[-1].done == blob[-1].total
    assert [p.done for p in blob] == sorted(p.done for p in blob)
    d = result.to_dict()
    assert d["ok"] is True and d["checks"]


def test_verify_can_be_cancelled():
    calls = []

    async def main():
        image = await open_image(ref("special-esgz-64k"))
        with anyio.CancelScope() as scope:
            def progress(p):
                calls.append(p)
                if p.stage == "blob":
                    scope.cancel()
            await verify_image(image, full=True, progress=progress)
            return "finished"
        return "cancelled"

    assert anyio.run(main) == "cancelled"
    assert any(p.stage == "blob" for p in calls)
