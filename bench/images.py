"""Building (and caching) the benchmark layers as eStargz blobs.

The project's writer (``core.estargz.writer``) builds them; the results name
it. Built blobs are cached under the work dir, keyed by the layer's
parameters and the writer's source, so repeated runs skip the build.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tarfile
import time

from . import gen

LAYERS = {
    # name: (generator, full-size parameter, quick parameter)
    "big": ("write_big", 1.0, 0.1),
    "text": ("write_text", 256 << 20, 32 << 20),
    "many": ("write_many", 100_000, 10_000),
}
CHUNK_SIZE = 4 << 20


def _writer():
    """(callable(tar_path, out_path) -> dict, an id naming the writer's source)."""
    from core.estargz import tarwrite, writer  # noqa: PLC0415

    src = hashlib.sha256((inspect.getsource(writer) + inspect.getsource(tarwrite)).encode())

    def write(tar_path: str, out_path: str) -> dict:
        res = writer.build_estargz(tar_path, out_path, chunk_size=CHUNK_SIZE)
        return {"path": out_path, "digest": res.blob_digest, "size": res.blob_size,
                "diff_id": res.diff_id, "uncompressed_size": res.uncompressed_size,
                "toc_digest": res.toc_digest}

    return write, f"core.estargz.writer.build_estargz@{src.hexdigest()[:12]}"


def build_layers(workdir: str, quick: bool, log=print, names=None) -> dict:
    """Build (or reuse) the three layers (or those of ``names``); returns
    name -> layer dict."""
    out = {}
    for name, (genfn, full, small) in LAYERS.items():
        if names is None or name in names:
            out[name] = build_layer(workdir, name, genfn, small if quick else full, log=log)
    return out


def build_layer(workdir: str, name: str, genfn: str, param, log=print) -> dict:
    """Build (or reuse, keyed by name, parameter and writer) one layer from
    ``bench.gen.<genfn>(tar_path, param)``; returns its layer dict."""
    write, writer_id = _writer()
    os.makedirs(workdir, exist_ok=True)
    key = hashlib.sha256(f"{name}:{param}:{writer_id}:v3".encode()).hexdigest()[:12]
    tar_path = os.path.join(workdir, f"{name}-{param}.tar")

    def make_tar(path: str) -> None:
        if not os.path.exists(path):
            getattr(gen, genfn)(path + ".tmp", param)
            os.replace(path + ".tmp", path)

    return _build_cached(os.path.join(workdir, f"{name}-{key}.esgz"), tar_path, make_tar,
                         keep_tar=True, log=log)


def build_extra(workdir: str, name: str, make_tar) -> dict:
    """One more layer, cached like :func:`build_layers`' (B11/B12 build many
    small ones): ``make_tar(path)`` writes its tar; ``name`` must say every
    parameter of it. Returns the layer dict."""
    _, writer_id = _writer()
    key = hashlib.sha256(f"{name}:{writer_id}:v1".encode()).hexdigest()[:12]
    d = os.path.join(workdir, "extra")
    os.makedirs(d, exist_ok=True)
    return _build_cached(os.path.join(d, f"{name}-{key}.esgz"), os.path.join(d, f"{name}.tar"),
                         make_tar, keep_tar=False, log=None)


def _build_cached(blob_path: str, tar_path: str, make_tar, *, keep_tar: bool, log) -> dict:
    """The layer dict kept beside ``blob_path``, else: ``make_tar(tar_path)``,
    the project's writer, the dict written next to the blob."""
    meta_path = blob_path + ".json"
    if os.path.exists(meta_path) and os.path.exists(blob_path):
        with open(meta_path) as f:
            return json.load(f)
    write, writer_id = _writer()
    t0 = time.monotonic()
    make_tar(tar_path)
    meta = write(tar_path, blob_path + ".tmp")
    os.replace(blob_path + ".tmp", blob_path)
    meta["path"] = blob_path
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
    meta["entries"] = len(members)
    meta["files"] = sum(1 for m in members if m.isreg())
    meta["writer"] = writer_id
    if keep_tar:
        meta["tar"] = tar_path
    else:
        os.unlink(tar_path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    if log is not None:
        log(f"  built layer {os.path.basename(blob_path)}: {meta['size'] / 1e6:.1f} MB blob, "
            f"{meta['entries']} entries ({time.monotonic() - t0:.1f} s, {writer_id})")
    return meta
