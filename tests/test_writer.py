"""The eStargz writer: round trips through our reader, through plain
`gzip -d`, layout details shared with upstream, streaming, and `convert`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tracemalloc

import anyio
import pytest
import zstandard
from fixture_truth import (
    blob_path,
    cli,
    compare_listing,
    layer_digests,
    merge,
    read_tar_layer,
    ref,
    truth_layers,
)

from core.estargz import load_layer_index, read_file_range
from core.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from core.estargz.writer import build_estargz
from core.inspect import entry_record
from core.source import LocalBlobSource

GZIP_LAYERS = [(tag, i) for tag in ("mini-gzip", "special-gzip")
               for i in range(len(layer_digests(tag)))]


def _read_back(path: str, result):
    async def main():
        src = LocalBlobSource(path, result.blob_digest)
        ix = await load_layer_index(src, expected_toc_digest=result.toc_digest)
        files = {}
        for e in ix.iter_entries():
            if e.type in ("reg", "hardlink"):
                files[e.path] = await read_file_range(ix, src, e)
        return ix, files

    return anyio.run(main)


@pytest.mark.parametrize("chunk_size", [4 << 20, 64 << 10, 4096])
@pytest.mark.parametrize("tag,layer", GZIP_LAYERS)
def test_round_trip_through_our_reader(tmp_path, tag, layer, chunk_size):
    src = blob_path(layer_digests(tag)[layer])
    truth = read_tar_layer(src)
    out = str(tmp_path / "layer.esgz")
    res = build_estargz(src, out, chunk_size=chunk_size)
    with open(out, "rb") as f:
        blob = f.read()
    assert res.blob_size == len(blob)
    assert res.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    ix, files = _read_back(out, res)
    assert ix.format == "estargz" and ix.no_prefetch and ix.prefetch_end is None
    compare_listing([entry_record(e) for e in ix.iter_entries() if e.id], truth)
    for p, rec in truth.items():
        if rec["type"] in ("reg", "hardlink"):
            assert files[p] == rec["data"], p
            if rec["type"] == "reg":
                assert ix.lookup(p).digest == "sha256:" + hashlib.sha256(rec["data"]).hexdigest()
    # Chunks: at most chunk_size each, every one starts a gzip member.
    for c in ix.all_chunks():
        assert c.chunk_size <= chunk_size and c.inner_offset == 0
        assert blob[c.offset : c.offset + 3] == b"\x1f\x8b\x08"
    big = [p for p, r in truth.items() if r["type"] == "reg" and r["size"] > chunk_size]
    for p in big:
        assert len(ix.chunks(ix.lookup(p))) == -(-truth[p]["size"] // chunk_size)
    # The annotations carry the TOC digest and the uncompressed size.
    ann = res.annotations()
    assert ann["containerd.io/snapshot/stargz/toc.digest"] == ix.toc_digest
    assert int(ann["io.containers.estargz.uncompressed-size"]) == len(gzip.decompress(blob))


@pytest.mark.parametrize("tag,layer", GZIP_LAYERS)
def test_output_is_plain_gzip_of_a_tar_equal_to_the_input(tmp_path, tag, layer):
    src = blob_path(layer_digests(tag)[layer])
    out = str(tmp_path / "layer.esgz")
    res = build_estargz(src, out, chunk_size=64 << 10)
    p = subprocess.run(["gzip", "-dc", out], capture_output=True, check=True)
    assert p.stderr == b""
    tar_bytes = p.stdout
    assert res.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert res.uncompressed_size == len(tar_bytes)
    (tmp_path / "out.tar").write_bytes(tar_bytes)
    got = read_tar_layer(str(tmp_path / "out.tar"))
    want = read_tar_layer(src)
    # The writer adds the landmark and the TOC; everything else is the input.
    assert got.pop(NO_PREFETCH_LANDMARK)["data"] == b"\x0f"
    toc = json.loads(got.pop("stargz.index.json")["data"])
    assert "sha256:" + hashlib.sha256(json.dumps(toc, indent="\t", ensure_ascii=False)
                                      .encode()).hexdigest() == res.toc_digest
    assert got.keys() == want.keys()
    for path, rec in want.items():
        assert got[path] == rec, path
    # And the members come in the input's order, after the landmark.
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        names = [m.name for m in tf.getmembers()]
    with tarfile.open(src) as tf:
        in_names = [m.name for m in tf.getmembers()]
    assert names[0] == NO_PREFETCH_LANDMARK and names[-1] == "stargz.index.json"
    assert names[1:-1] == in_names


def test_prioritized_files_go_first_with_a_prefetch_landmark(tmp_path):
    src = blob_path(layer_digests("mini-gzip")[0])
    out = str(tmp_path / "layer.esgz")
    prio = ["data/hardlink.bin", "etc/os-release", "missing/file"]
    res = build_estargz(src, out, chunk_size=64 << 10, prioritized_files=prio)
    assert res.missed_prioritized == ["missing/file"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(open(out, "rb").read()))) as tf:
        names = [m.name.rstrip("/") for m in tf.getmembers()]
    # Upstream's moveRec: parents first, a hardlink's target before it.
    assert names[: names.index(PREFETCH_LANDMARK) + 1] == [
        "data", "data/random.bin", "data/hardlink.bin", "etc", "etc/os-release",
        PREFETCH_LANDMARK]
    ix, files = _read_back(out, res)
    assert not ix.no_prefetch and ix.prefetch_end is not None
    prefetched = {ix.path_of(c.entry_id) for c in ix.all_chunks() if c.offset < ix.prefetch_end}
    assert prefetched == {"data/random.bin", "etc/os-release"}
    truth = read_tar_layer(src)
    assert files["etc/os-release"] == truth["etc/os-release"]["data"]
    with pytest.raises(Exception, match="not in the layer"):
        build_estargz(src, str(tmp_path / "x"), prioritized_files=["nope"],
                      allow_missing_prioritized=False)


def test_compressed_and_plain_inputs_give_the_same_blob(tmp_path):
    src = blob_path(layer_digests("special-gzip")[0])
    tar_bytes = gzip.decompress(open(src, "rb").read())
    (tmp_path / "in.tar").write_bytes(tar_bytes)
    (tmp_path / "in.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar_bytes))
    results = [build_estargz(str(tmp_path / name), str(tmp_path / f"out{i}"))
               for i, name in enumerate(["in.tar", "in.tar.zst"])]
    results.append(build_estargz(src, str(tmp_path / "out2")))
    with open(tmp_path / "in.tar", "rb") as f:  # a file object works too
        results.append(build_estargz(f, str(tmp_path / "out3")))
    assert len({r.blob_digest for r in results}) == 1
    assert len({r.toc_digest for r in results}) == 1


def test_writer_streams_large_files(tmp_path):
    """A 48 MiB file converts without holding it in memory."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(big, arcname="big.bin")
    tracemalloc.start()
    try:
        res = build_estargz(str(tar_path), str(tmp_path / "out.esgz"))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"
    assert res.chunks == 12 + 1  # 48 MiB in 4 MiB chunks, plus the landmark
    ix, files = _read_back(str(tmp_path / "out.esgz"), res)
    assert files["big.bin"] == big.read_bytes()


def test_convert_command_writes_a_verifiable_layout(tmp_path):
    dst = tmp_path / "out"
    cli("convert", ref("mini-gzip"), f"oci:{dst}:mini-esgz", "--chunk-size", "64K",
        "--prioritize-file", "etc/os-release,data/text.txt", "-q")
    # A second tag into the same layout, from an eStargz and a zstd:chunked source.
    cli("convert", ref("special-zstdchunked"), f"oci:{dst}:special-esgz", "-q")
    cli("convert", ref("mini-esgz"), f"oci:{dst}:mini-again", "--json")
    with open(dst / "index.json") as f:
        tags = [m["annotations"]["org.opencontainers.image.ref.name"]
                for m in json.load(f)["manifests"]]
    assert sorted(tags) == ["mini-again", "mini-esgz", "special-esgz"]
    for tag, family in (("mini-esgz", "mini-gzip"), ("special-esgz", "special-gzip"),
                        ("mini-again", "mini-gzip")):
        image = f"oci:{dst}:{tag}"
        assert b"all checks hold" in cli("verify", image, "--full").stdout
        info = json.loads(cli("inspect", image, "--json").stdout)
        assert all(la["format"] == "estargz" and la["tocDigestVerified"] for la in info["layers"])
        records = json.loads(cli("ls", image, "-R", "--json").stdout)
        want = merge(truth_layers(family))
        compare_listing(records, want)
        if family == "mini-gzip":
            assert cli("cat", image, "data/text.txt").stdout == want["data/text.txt"]["data"]
    mini = json.loads(cli("inspect", f"oci:{dst}:mini-esgz", "--json").stdout)
    assert mini["layers"][0]["prefetchSize"] > 0
    # Converting again replaces the tag instead of adding a second entry.
    cli("convert", ref("mini-gzip"), f"oci:{dst}:mini-esgz", "-q")
    with open(dst / "index.json") as f:
        assert len(json.load(f)["manifests"]) == 3
