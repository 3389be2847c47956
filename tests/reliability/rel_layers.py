"""Hand-made eStargz blobs and OCI layouts for the hostile-input tests.

A blob is built the way the upstream writer lays it out: each file's tar
header and data in gzip members, then a gzip member holding the
``stargz.index.json`` tar entry (the TOC), then the 51-byte eStargz footer.
The TOC JSON is whatever the test hands in, so it can lie about anything
while the surrounding bytes stay a valid eStargz blob.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

from core.estargz.footer import estargz_footer


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT)


class BlobBuilder:
    """Lay out file contents as gzip members; remember where each starts."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.offsets: dict[str, int] = {}
        self.ends: dict[str, int] = {}

    def add_file(self, name: str, data: bytes, chunk_size: int | None = None) -> list[dict]:
        """Append ``name``'s tar header and data; return its TOC entries
        (the ``reg`` entry and any ``chunk`` entries) with true offsets."""
        self.buf.write(_member(_tar_header(name, len(data))))
        entries = []
        step = chunk_size or max(1, len(data))
        pos = 0
        while True:
            piece = data[pos : pos + step]
            off = self.buf.tell()
            if piece:
                self.buf.write(_member(piece))
            e = {
                "name": name, "offset": off, "chunkOffset": pos, "chunkSize": len(piece),
                "chunkDigest": sha256(piece),
            }
            if pos == 0:
                e.update({"type": "reg", "size": len(data), "mode": 0o644,
                          "digest": sha256(data)})
            else:
                e["type"] = "chunk"
            entries.append(e)
            self.offsets.setdefault(name, off)
            pos += step
            if pos >= len(data):
                break
        if len(entries) == 1:
            entries[0].pop("chunkOffset")
            entries[0].pop("chunkSize")
        self.ends[name] = self.buf.tell()
        return entries

    def finish(self, toc: dict | bytes, *, toc_member: bytes | None = None) -> bytes:
        """Append the TOC member (from ``toc`` JSON, or raw ``toc_member``
        bytes) and the footer; return the whole blob."""
        toc_off = self.buf.tell()
        if toc_member is None:
            raw = toc if isinstance(toc, bytes) else json.dumps(toc).encode()
            toc_member = _member(_tar_header("stargz.index.json", len(raw)) + raw + b"\0" * (
                (512 - len(raw) % 512) % 512) + b"\0" * 1024)
        self.buf.write(toc_member)
        self.buf.write(estargz_footer(toc_off))
        return self.buf.getvalue()


def toc_digest_of(blob: bytes) -> str:
    """The TOC digest (sha256 of the TOC JSON) of a blob built here."""
    from core.estargz.footer import parse_footer
    from core.estargz.loader import _inflate_gzip_toc

    f = parse_footer(blob[-64:], len(blob))
    return sha256(_inflate_gzip_toc(blob[f.toc_offset : len(blob) - f.footer_size]))


def simple_layer(extra_entries: list[dict] | None = None, *, files=None,
                 replace: bool = False) -> bytes:
    """A small valid layer (dir + two files), plus ``extra_entries`` appended
    to its TOC (or instead of the default ones with ``replace``)."""
    b = BlobBuilder()
    files = files if files is not None else {"etc/hello.txt": b"hello world\n" * 10,
                                             "data/big.bin": os.urandom(3000)}
    entries = [{"name": "etc/", "type": "dir", "mode": 0o755},
               {"name": "data/", "type": "dir", "mode": 0o755}]
    for name, data in files.items():
        entries += b.add_file(name, data, chunk_size=1024 if len(data) > 2048 else None)
    if replace:
        entries = []
    entries += extra_entries or []
    return b.finish({"version": 1, "entries": entries})


def write_layout(root: str, layers: list[bytes], *, tag: str = "t", annotate_toc: bool = True,
                 config: dict | bytes | None = None, manifest_override=None,
                 index_override=None, layer_media_type=None) -> str:
    """Write an OCI layout at ``root`` holding one image tagged ``tag`` whose
    layers are ``layers``; return the ``oci:ROOT:TAG`` reference."""
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        with open(os.path.join(blobs, d[7:]), "wb") as f:
            f.write(data)
        return d

    descs = []
    for blob in layers:
        ann = {}
        if annotate_toc:
            try:
                ann["containerd.io/snapshot/stargz/toc.digest"] = toc_digest_of(blob)
            except Exception:  # a deliberately broken TOC: no annotation
                pass
        descs.append({"mediaType": layer_media_type
                      or "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": put(blob), "size": len(blob), "annotations": ann})
    if config is None:
        config = {"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [sha256(b"x")] * len(layers)}}
    cfg = config if isinstance(config, bytes) else json.dumps(config).encode()
    cfg_digest = put(cfg)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cfg_digest, "size": len(cfg)},
                "layers": descs}
    if manifest_override is not None:
        manifest = manifest_override(manifest)
    mbytes = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    mdigest = put(mbytes)
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
         "size": len(mbytes), "annotations": {"org.opencontainers.image.ref.name": tag},
         "platform": {"architecture": "amd64", "os": "linux"}}]}
    if index_override is not None:
        index = index_override(index, put)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    return f"oci:{root}:{tag}"
