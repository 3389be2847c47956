"""What ``inspect``, ``ls`` and ``cat`` show, as plain data, for the CLI and
the app alike: image and layer summaries (dicts with the documented JSON
keys, see the README, "JSON output"), entry records, and a file-system view of an image
(merged, with whiteouts applied, or one raw layer) that lists, resolves
symlinks like a container would and streams file bytes.
"""

from __future__ import annotations

import base64
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from .errors import CoreError, FormatError, NotFoundError
from .estargz import iter_file, load_layer_index, read_footer
from .estargz.footer import Format
from .estargz.plain import build_plain_index, iter_plain_file
from .estargz.toc import DIR, HARDLINK, REG, SYMLINK, Entry, LayerIndex
from .image import TOC_DIGEST_ANNOTATION, Image, LayerDescriptor
from .overlay import MergedTree
from .verify import chain_ids

MAX_SYMLINK_HOPS = 40


# ---------------------------------------------------------------- layers
async def load_index(image: Image, desc: LayerDescriptor, *,
                     progress: Callable[[int, int], None] | None = None) -> LayerIndex:
    """The entry index of a layer: its TOC for lazy formats (not checked
    against the annotation here: ``layer_info`` and ``core.verify`` compare),
    or, for plain tar/gzip/zstd layers, an index built by streaming the blob.
    Foreign layers are refused (their blobs are not the registry's to give)."""
    if desc.foreign:
        raise FormatError(desc.foreign_reason())
    source = image.store.blob_source(desc.digest, desc.size)
    footer = await read_footer(source, desc.annotations)
    if footer.format in Format.LAZY:
        return await load_layer_index(source, annotations=desc.annotations)
    return await build_plain_index(source, footer.format, progress)


def _prefetch_size(ix: LayerIndex) -> int | None:
    return ix.prefetch_end if ix.prefetch_end is not None else None


async def layer_info(image: Image, desc: LayerDescriptor) -> dict:
    """One layer's summary (the items of ``inspect --json``'s ``layers``)."""
    # The TOC's trust anchor: eStargz's toc.digest, else a zstd:chunked
    # manifest checksum (the sha256 of the compressed TOC, not of its JSON).
    anchor = desc.toc_anchor
    ann = desc.annotations.get(anchor) if anchor else None
    info: dict = {
        "index": desc.index,
        "digest": desc.digest,
        "mediaType": desc.media_type,
        "size": desc.size,
        "format": None,
        "tocDigest": None,
        "tocDigestAnnotated": ann,
        "tocDigestVerified": None,
        "tocDigestAnchor": anchor,
        "diffID": desc.diff_id,
        "uncompressedSize": desc.uncompressed_size_annotation,
        "entries": None,
        "chunks": None,
        "prefetchSize": None,
        "prefetchChunks": None,
        "noPrefetchLandmark": None,
        "tocOffset": None,
        "tocSize": None,
        "manifestChecksumAnnotated": desc.zstd_manifest_checksum,
        "manifestChecksum": None,
        "annotations": dict(desc.annotations),
        "foreign": desc.foreign,
        "urls": list(desc.urls),
        "error": None,
    }
    if desc.foreign:
        return info  # shown, never fetched
    try:
        source = image.store.blob_source(desc.digest, desc.size)
        footer = await read_footer(source, desc.annotations)
    except CoreError as e:
        info["error"] = str(e)
        return info
    info["format"] = footer.format
    if footer.format not in Format.LAZY:
        return info
    try:
        ix = await load_layer_index(source, annotations=desc.annotations)
    except CoreError as e:
        info["error"] = str(e)
        return info
    info["tocDigest"] = ix.toc_digest
    info["manifestChecksum"] = ix.manifest_checksum
    if ann:
        computed = ix.toc_digest if anchor == TOC_DIGEST_ANNOTATION else ix.manifest_checksum
        info["tocDigestVerified"] = computed == ann
    info["entries"] = sum(1 for e in ix.iter_entries() if e.id != 0)
    info["chunks"] = ix.num_chunks
    info["prefetchSize"] = _prefetch_size(ix)
    info["prefetchChunks"] = ix.prefetch_chunk_count if ix.prefetch_end is not None else None
    info["noPrefetchLandmark"] = ix.no_prefetch
    info["tocOffset"] = ix.toc_offset
    info["tocSize"] = ix.toc_size
    return info


def config_summary(config: dict) -> dict:
    c = config.get("config") or {}
    return {
        "os": config.get("os"),
        "architecture": config.get("architecture"),
        "variant": config.get("variant"),
        "created": config.get("created"),
        "author": config.get("author"),
        "cmd": c.get("Cmd"),
        "entrypoint": c.get("Entrypoint"),
        "env": c.get("Env"),
        "workingDir": c.get("WorkingDir") or None,
        "user": c.get("User") or None,
        "labels": c.get("Labels"),
        "exposedPorts": sorted((c.get("ExposedPorts") or {}).keys()) or None,
        "history": len(config.get("history") or []),
    }


async def inspect_image(image: Image, *,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """The whole ``inspect --json`` object (see the README, "JSON output")."""
    layers = []
    for i, desc in enumerate(image.layers):
        layers.append(await layer_info(image, desc))
        if progress is not None:
            progress(i + 1, len(image.layers))
    diff_ids = list((image.config.get("rootfs") or {}).get("diff_ids") or [])
    return {
        "reference": str(image.reference),
        "manifestDigest": image.manifest_digest,
        "manifestMediaType": image.manifest_media_type,
        "indexDigest": image.index_digest,
        "platform": image.platform,
        "platforms": image.platforms,
        "configDigest": image.config_digest,
        "config": config_summary(image.config),
        "diffIDs": diff_ids,
        "chainID": chain_ids(diff_ids)[-1] if diff_ids else None,
        "size": sum(d.size for d in image.layers),
        "layers": layers,
    }


# ---------------------------------------------------------------- entries
_FILE_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "hardlink": stat.S_IFREG,
                   "symlink": stat.S_IFLNK, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
                   "fifo": stat.S_IFIFO}


def mode_string(type_: str, mode: int) -> str:
    """``ls -l``'s ``drwxr-xr-x`` (with s/S/t/T for setuid, setgid, sticky)."""
    return stat.filemode(_FILE_TYPE_BITS.get(type_, 0) | (mode & 0o7777))


def entry_record(entry: Entry, path: str | None = None, layer: int | None = None) -> dict:
    """An entry as an ``ls --json`` object (see the README, "JSON output")."""
    mtime = entry.mtime
    return {
        "path": entry.path if path is None else path,
        "type": entry.type,
        "size": entry.size if entry.type in ("reg", "hardlink") else 0,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "linkTarget": entry.link_name if entry.type in ("symlink", "hardlink") else None,
        "mtime": int(mtime) if mtime == int(mtime) else mtime,
        "xattrs": {k: base64.b64encode(v).decode() for k, v in sorted(entry.xattrs.items())},
        "devMajor": entry.dev_major if entry.type in ("char", "block") else None,
        "devMinor": entry.dev_minor if entry.type in ("char", "block") else None,
        "digest": entry.digest if entry.type == "reg" else None,
        "layer": layer,
    }


def format_long(rec: dict, name: str) -> str:
    """One ``ls -l`` line for an entry record."""
    when = datetime.fromtimestamp(rec["mtime"] or 0, UTC).strftime("%Y-%m-%d %H:%M")
    if rec["type"] in ("char", "block"):
        size = f"{rec['devMajor']}, {rec['devMinor']}"
    else:
        size = str(rec["size"])
    line = (f"{mode_string(rec['type'], rec['mode'])} {rec['uid']:>5}:{rec['gid']:<5} "
            f"{size:>10} {when} {name}")
    if rec["type"] == "symlink":
        line += f" -> {rec['linkTarget']}"
    elif rec["type"] == "hardlink":
        line += f" link to {rec['linkTarget']}"
    return line


# ---------------------------------------------------------------- tree
def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


class ImageTree:
    """A read-only file-system view of an image: the merged view of every
    layer (``layer=None``) or one raw layer (whiteouts visible)."""

    def __init__(self, image: Image, indexes: list[LayerIndex], descs: list[LayerDescriptor],
                 raw: bool):
        self.image = image
        self.indexes = indexes
        self.descs = descs
        self.raw = raw
        self.merged = None if raw else MergedTree(indexes)

    @classmethod
    async def open(cls, image: Image, layer=None) -> ImageTree:
        """Load what the view needs (``layer``: index or digest for a raw layer)."""
        if layer is not None:
            desc = image.layer(layer)
            return cls(image, [await load_index(image, desc)], [desc], raw=True)
        descs = list(image.layers)
        return cls(image, [await load_index(image, d) for d in descs], descs, raw=False)

    def layer_no(self, i: int) -> int:
        """The image's layer number for position ``i`` of this view."""
        return self.descs[i].index

    def lookup(self, path: str) -> tuple[int, Entry] | None:
        if self.raw:
            e = self.indexes[0].lookup("/".join(_split(path)))
            return (0, e) if e is not None else None
        return self.merged.lookup(path)

    def children(self, path: str) -> list[tuple[str, int, Entry]]:
        if self.raw:
            ix = self.indexes[0]
            d = ix.lookup("/".join(_split(path)))
            if d is None or d.type_code != DIR:
                return []
            return [(c.name, 0, c) for c in ix.children(d)]
        return self.merged.children(path)

    def resolve(self, path: str, *, follow_last: bool = True) -> tuple[str, int, Entry]:
        """``(path, view_layer, entry)`` after following symlinks inside the
        image (absolute targets from its root, ``..`` stopping at the root),
        as a process inside the container would see it."""
        pending = _split(path)
        resolved: list[str] = []
        hops = 0
        if not pending:
            hit = self.lookup("")
            return "", hit[0], hit[1]
        while pending:
            name = pending.pop(0)
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            cur = resolved + [name]
            hit = self.lookup("/".join(cur))
            if hit is None:
                raise NotFoundError(f"{path}: no such file or directory in the image")
            li, e = hit
            if e.type_code == SYMLINK and (pending or follow_last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise NotFoundError(f"{path}: too many levels of symbolic links")
                target = e.link_name
                if target.startswith("/"):
                    resolved = []
                pending = _split(target) + pending
                continue
            if pending and e.type_code != DIR:
                raise NotFoundError(f"{path}: {'/'.join(cur)} is not a directory")
            resolved = cur
        p = "/".join(resolved)
        hit = self.lookup(p)
        if hit is None:  # pragma: no cover - resolved paths exist
            raise NotFoundError(f"{path}: no such file or directory in the image")
        return p, hit[0], hit[1]

    def hardlink_below(self, li: int, e: Entry) -> tuple[int, Entry] | None:
        """The file a hardlink names in the layers below its own, when its
        target is not in its layer (overlayfs links it to that file)."""
        if self.raw or e.type_code != HARDLINK or e.target_id is not None or li == 0:
            return None
        hit = MergedTree(self.indexes[:li]).lookup(e.link_name)
        if hit is None or hit[1].type_code not in (REG, HARDLINK):
            return None
        t = hit[1]
        if t.type_code == HARDLINK:
            if t.target_id is None:
                return self.hardlink_below(hit[0], t)
            t = self.indexes[hit[0]].entry(t.target_id)
        return hit[0], t

    def record(self, path: str, li: int, e: Entry) -> dict:
        rec = entry_record(e, path, self.layer_no(li))
        below = self.hardlink_below(li, e)
        if below is not None:  # the merged file is the earlier layer's
            t = below[1]
            rec.update(size=t.size, mode=t.mode, uid=t.uid, gid=t.gid)
        return rec

    def list(self, path: str = "", *, recursive: bool = False) -> list[dict]:
        """Entry records under ``path`` (sorted by path), or the entry itself
        when it is not a directory. Symlinks inside ``path`` are followed,
        the last component only when ``path`` ends with ``/``."""
        p, li, e = self.resolve(path, follow_last=path.endswith("/") and bool(_split(path)))
        if e.type_code != DIR:
            return [self.record(p, li, e)]
        out = []
        stack = [p]
        while stack:
            base = stack.pop()
            kids = self.children(base)
            for name, kli, ke in kids:
                kp = f"{base}/{name}" if base else name
                out.append(self.record(kp, kli, ke))
                if recursive and ke.type_code == DIR:
                    stack.append(kp)
        out.sort(key=lambda r: r["path"])
        return out

    async def iter_bytes(self, path: str) -> AsyncIterator[bytes]:
        """A regular file's bytes (symlinks followed, hardlinks to their
        target), fetching only its chunks for lazy layers."""
        p, li, e = self.resolve(path)
        if e.type_code == DIR:
            raise FormatError(f"{path}: is a directory")
        below = self.hardlink_below(li, e)
        if below is not None:
            li, e = below
        if e.type_code not in (REG,) and e.target_id is None:
            raise FormatError(f"{path}: is a {e.type}, not a regular file")
        ix = self.indexes[li]
        desc = self.descs[li]
        source = self.image.store.blob_source(desc.digest, desc.size)
        if ix.format in Format.LAZY:
            async for piece in iter_file(ix, source, e):
                yield piece
        else:
            async for piece in iter_plain_file(ix, source, e):
                yield piece

    async def read(self, path: str) -> bytes:
        return b"".join([p async for p in self.iter_bytes(path)])
