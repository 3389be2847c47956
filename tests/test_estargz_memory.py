"""A 100k-entry TOC must index compactly (issue 2: <= ~300 bytes/entry resident)."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc

from core.estargz.footer import Format
from core.estargz.toc import build_index

N_DIRS, PER_DIR = 1000, 99  # 100k entries with the dirs


def _toc() -> tuple[bytes, int]:
    entries, off = [], 0
    for d in range(N_DIRS):
        entries.append({"name": f"usr/share/pkg{d:05d}/", "type": "dir", "mode": 0o755,
                        "modtime": "2023-11-14T22:13:20Z"})
        for i in range(PER_DIR):
            h = hashlib.sha256(f"{d}/{i}".encode()).hexdigest()
            entries.append({
                "name": f"usr/share/pkg{d:05d}/module_{d}_{i:04d}.py", "type": "reg",
                "size": 1000 + i, "modtime": "2023-11-14T22:13:20Z", "mode": 0o644,
                "uid": 1000, "gid": 1000, "offset": off, "digest": "sha256:" + h,
                "chunkDigest": "sha256:" + h[::-1],
            })
            off += 700
    return json.dumps({"version": 1, "entries": entries}).encode(), off


def test_100k_entry_toc_is_compact():
    toc, end = _toc()
    # Parse the JSON before tracing (json.loads under tracemalloc is slow);
    # build_index accepts the parsed document, and everything the index
    # keeps is allocated by build_index itself, so it is traced.
    doc = json.loads(toc)
    del toc
    gc.collect()
    tracemalloc.start()
    try:
        ix = build_index(doc, format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64,
                         blob_size=end + 4096, toc_digest="sha256:" + "1" * 64,
                         toc_offset=end + 100)
        del doc
        gc.collect()
        resident, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = len(ix)
    assert n == N_DIRS * (PER_DIR + 1) + 3  # + the root, usr and usr/share (implicit)
    per_entry = resident / n
    assert per_entry <= 300, f"{per_entry:.0f} bytes per entry resident"
    assert ix.memory_estimate() / n <= 300
    # The compact index still answers everything.
    e = ix.lookup("usr/share/pkg00042/module_42_0007.py")
    assert e is not None and e.size == 1007 and e.mode == 0o644 and e.uid == 1000
    assert e.digest == "sha256:" + hashlib.sha256(b"42/7").hexdigest()
    (chunk,) = ix.chunks(e)
    assert chunk.digest == "sha256:" + hashlib.sha256(b"42/7").hexdigest()[::-1]
    assert [c.name for c in ix.children(ix.lookup("usr/share"))][:2] == ["pkg00000", "pkg00001"]
