"""Building (and caching) the benchmark layers as eStargz blobs.

The project's writer (``core.estargz.writer``) is used when it is there;
otherwise the suite falls back to :mod:`bench.refwriter` and says so in the
results. Built blobs are cached under the work dir, keyed by the layer's
parameters and the writer's source, so repeated runs skip the build.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tarfile
import time

from . import gen, refwriter

LAYERS = {
    # name: (generator, full-size parameter, quick parameter)
    "big": ("write_big", 1.0, 0.1),
    "text": ("write_text", 256 << 20, 32 << 20),
    "many": ("write_many", 100_000, 10_000),
}
CHUNK_SIZE = 4 << 20


def _project_writer():
    """(callable(tar_path, out_path) -> dict, source hash) or None."""
    try:
        from core.estargz import writer  # noqa: PLC0415
    except ImportError:
        return None
    src = hashlib.sha256(inspect.getsource(writer).encode()).hexdigest()[:12]
    for name in ("write_estargz", "convert_tar", "tar_to_estargz", "build_estargz"):
        fn = getattr(writer, name, None)
        if callable(fn):
            return _adapt(fn), f"core.estargz.writer.{name}@{src}"
    return None


def _adapt(fn):
    def run(tar_path: str, out_path: str) -> dict:
        sig = inspect.signature(fn)
        kwargs = {}
        if "chunk_size" in sig.parameters:
            kwargs["chunk_size"] = CHUNK_SIZE
        first = next(iter(sig.parameters))
        if first in ("src", "tar", "source", "tar_file", "fileobj", "reader"):
            with open(tar_path, "rb") as src, open(out_path, "wb") as dst:
                res = fn(src, dst, **kwargs)
        else:
            res = fn(tar_path, out_path, **kwargs)
        return _describe(res, out_path, tar_path)

    return run


def _get(res, *names):
    for n in names:
        if isinstance(res, dict) and n in res:
            return res[n]
        if hasattr(res, n):
            return getattr(res, n)
    return None


def _describe(res, out_path: str, tar_path: str) -> dict:
    """Normalise a writer's result; compute what it does not tell."""
    blob = hashlib.sha256()
    with open(out_path, "rb") as f:
        while b := f.read(8 << 20):
            blob.update(b)
    toc = _get(res, "toc_digest")
    diff = _get(res, "diff_id", "diffid", "uncompressed_digest")
    usize = _get(res, "uncompressed_size")
    if diff is None or usize is None:
        import gzip

        h = hashlib.sha256()
        n = 0
        with gzip.open(out_path, "rb") as g:
            while b := g.read(8 << 20):
                h.update(b)
                n += len(b)
        diff, usize = "sha256:" + h.hexdigest(), n
    if toc is None:
        import anyio

        from core.estargz import load_layer_index
        from core.source import LocalBlobSource

        ix = anyio.run(load_layer_index, LocalBlobSource(out_path, "sha256:unknown"))
        toc = ix.toc_digest
    return {"path": out_path, "digest": "sha256:" + blob.hexdigest(),
            "size": os.path.getsize(out_path), "diff_id": diff,
            "uncompressed_size": usize, "toc_digest": toc}


def build_layers(workdir: str, quick: bool, log=print) -> dict:
    """Build (or reuse) the three layers; returns name -> layer dict."""
    proj = _project_writer()
    if proj is not None:
        write, writer_id = proj
    else:
        writer_id = "bench.refwriter (fallback: core.estargz.writer not available)"

        def write(tar_path, out_path):
            w = refwriter.write_estargz(tar_path, out_path, chunk_size=CHUNK_SIZE)
            return {"path": out_path, "digest": w.digest, "size": w.size,
                    "diff_id": w.diff_id, "uncompressed_size": w.uncompressed_size,
                    "toc_digest": w.toc_digest}

    os.makedirs(workdir, exist_ok=True)
    out = {}
    for name, (genfn, full, small) in LAYERS.items():
        param = small if quick else full
        key = hashlib.sha256(f"{name}:{param}:{writer_id}:v3".encode()).hexdigest()[:12]
        tar_path = os.path.join(workdir, f"{name}-{param}.tar")
        blob_path = os.path.join(workdir, f"{name}-{key}.esgz")
        meta_path = blob_path + ".json"
        if os.path.exists(meta_path) and os.path.exists(blob_path):
            with open(meta_path) as f:
                out[name] = json.load(f)
            continue
        t0 = time.monotonic()
        if not os.path.exists(tar_path):
            getattr(gen, genfn)(tar_path + ".tmp", param)
            os.replace(tar_path + ".tmp", tar_path)
        meta = write(tar_path, blob_path + ".tmp")
        os.replace(blob_path + ".tmp", blob_path)
        meta["path"] = blob_path
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
        meta["entries"] = len(members)
        meta["files"] = sum(1 for m in members if m.isreg())
        meta["tar"] = tar_path
        meta["writer"] = writer_id
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        log(f"  built layer {name}: {meta['size'] / 1e6:.1f} MB blob, {meta['entries']} entries "
            f"({time.monotonic() - t0:.1f} s, {writer_id})")
        out[name] = meta
    return out


def build_extra(workdir: str, name: str, make_tar) -> dict:
    """One more layer, cached like :func:`build_layers`' (B11/B12 build many
    small ones): ``make_tar(path)`` writes its tar; ``name`` must say every
    parameter of it. Returns the layer dict."""
    proj = _project_writer()
    if proj is None:
        raise RuntimeError("core.estargz.writer is not there")
    write, writer_id = proj
    key = hashlib.sha256(f"{name}:{writer_id}:v1".encode()).hexdigest()[:12]
    d = os.path.join(workdir, "extra")
    os.makedirs(d, exist_ok=True)
    blob_path = os.path.join(d, f"{name}-{key}.esgz")
    meta_path = blob_path + ".json"
    if os.path.exists(meta_path) and os.path.exists(blob_path):
        with open(meta_path) as f:
            return json.load(f)
    tar_path = os.path.join(d, f"{name}.tar")
    make_tar(tar_path)
    meta = write(tar_path, blob_path + ".tmp")
    os.replace(blob_path + ".tmp", blob_path)
    meta["path"] = blob_path
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
    meta["entries"] = len(members)
    meta["files"] = sum(1 for m in members if m.isreg())
    meta["writer"] = writer_id
    os.unlink(tar_path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta
