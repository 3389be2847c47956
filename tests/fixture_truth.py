"""Ground truth for the fixture layout: the plain ``*-gzip`` layers read with
Python's tarfile, raw and merged (whiteouts applied here, independently of
core.overlay). Shared by the fixture, CLI and verify tests."""

from __future__ import annotations

import base64
import json
import os
import posixpath
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = os.path.join(REPO, "tests", "fixtures", "estargz-oci")
FAMILIES = {
    "mini": ["mini-esgz", "mini-esgz-64k", "mini-esgz-prefetch", "mini-zstdchunked", "mini-gzip"],
    "special": ["special-esgz", "special-esgz-64k", "special-zstdchunked", "special-gzip"],
}
ALL_TAGS = [t for tags in FAMILIES.values() for t in tags]
TYPES = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def family(tag: str) -> str:
    return tag.split("-", 1)[0]


def ref(tag: str, layout: str = LAYOUT) -> str:
    return f"oci:{layout}:{tag}"


def _manifest(tag: str, layout: str = LAYOUT) -> dict:
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    for m in index["manifests"]:
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag:
            return _blob_json(m["digest"], layout)
    raise KeyError(tag)


def _blob_json(digest: str, layout: str = LAYOUT) -> dict:
    with open(blob_path(digest, layout)) as f:
        return json.load(f)


def blob_path(digest: str, layout: str = LAYOUT) -> str:
    return os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])


def layer_digests(tag: str, layout: str = LAYOUT) -> list[str]:
    return [ld["digest"] for ld in _manifest(tag, layout)["layers"]]


def config(tag: str, layout: str = LAYOUT) -> dict:
    return _blob_json(_manifest(tag, layout)["config"]["digest"], layout)


def manifest(tag: str, layout: str = LAYOUT) -> dict:
    return _manifest(tag, layout)


def clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def read_tar_layer(path: str) -> dict[str, dict]:
    """path -> record (the ls --json keys) + ``data`` for regular files."""
    out: dict[str, dict] = {}
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()
        for m in members:
            p = clean(m.name)
            if p == "":
                continue
            rec = {
                "path": p,
                "type": TYPES.get(m.type, "reg"),
                "size": m.size if m.isreg() else 0,
                "mode": m.mode & 0o7777,
                "uid": m.uid,
                "gid": m.gid,
                "linkTarget": m.linkname if (m.issym() or m.islnk()) else None,
                "mtime": int(m.mtime),
                "xattrs": {k[13:]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
                           for k, v in sorted(m.pax_headers.items())
                           if k.startswith("SCHILY.xattr.")},
            }
            if m.ischr() or m.isblk():
                rec["devMajor"], rec["devMinor"] = m.devmajor, m.devminor
            if m.isreg():
                rec["data"] = tf.extractfile(m).read()
            out[p] = rec
        # A hardlink shows its target's size and bytes.
        for rec in out.values():
            if rec["type"] == "hardlink":
                target = out[clean(rec["linkTarget"])]
                rec["size"] = target["size"]
                rec["data"] = target["data"]
    return out


def truth_layers(tag: str) -> list[dict[str, dict]]:
    """The raw layers of ``tag``'s family, from its -gzip ground truth."""
    gz = f"{family(tag)}-gzip"
    return [read_tar_layer(blob_path(d)) for d in layer_digests(gz)]


def merge(layers: list[dict[str, dict]]) -> dict[str, dict]:
    """Apply whiteouts and opaque directories the way overlayfs does."""
    merged: dict[str, dict] = {}

    def drop_under(prefix: str) -> None:
        for p in [p for p in merged if p.startswith(prefix + "/")]:
            del merged[p]

    for layer in layers:
        for p in layer:
            d, name = posixpath.split(p)
            if name == ".wh..wh..opq":
                drop_under(d)
            elif name.startswith(".wh."):
                hidden = posixpath.join(d, name[4:])
                merged.pop(hidden, None)
                drop_under(hidden)
        for p, rec in layer.items():
            name = posixpath.basename(p)
            if name.startswith(".wh."):
                continue
            if rec["type"] != "dir":
                drop_under(p)
            merged[p] = rec
    return merged


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``stargz-tui`` as a subprocess."""
    p = subprocess.run([sys.executable, "-m", "stargz_tui", *args], capture_output=True,
                       cwd=REPO, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"stargz-tui {' '.join(args)} exited {p.returncode}: "
                             f"{p.stderr.decode(errors='replace')}")
    return p


COMPARED = ("type", "size", "mode", "uid", "gid", "linkTarget", "mtime", "xattrs")


def compare_listing(records: list[dict], truth: dict[str, dict]) -> None:
    """ls --json records against ground truth: same paths (directories the
    tar leaves implicit may be synthesised), same metadata."""
    got = {r["path"]: r for r in records}
    missing = sorted(set(truth) - set(got))
    assert not missing, f"missing from the listing: {missing[:10]}"
    extra = sorted(p for p in set(got) - set(truth) if got[p]["type"] != "dir")
    assert not extra, f"not in the ground truth: {extra[:10]}"
    for p, want in truth.items():
        have = got[p]
        for k in COMPARED:
            assert have[k] == want[k], f"{p}: {k} is {have[k]!r}, expected {want[k]!r}"
        if want["type"] in ("char", "block"):
            assert (have["devMajor"], have["devMinor"]) == (want["devMajor"], want["devMinor"]), p
