"""Extraction keeps what tar extraction keeps (issue 18 point 16): every
file's, symlink's and directory's mtime from the TOC, and hardlinks extracted
together as one file with several names. Checked against the fixture's own
tar, entry by entry."""

from __future__ import annotations

import os

import anyio
from fixture_truth import LAYOUT, truth_layers

from core.estargz import load_layer_index
from core.extract import extract
from core.image import open_image


async def _extract(tag: str, path: str, dest: str) -> None:
    img = await open_image(f"oci:{LAYOUT}:{tag}")
    try:
        desc = img.layers[0]
        source = img.store.blob_source(desc.digest, desc.size)
        ix = await load_layer_index(source)
        entry = ix.lookup(path)
        await extract(ix, source, entry, dest)
    finally:
        await img.store.aclose()


def test_extract_keeps_mtimes_and_hardlinks(tmp_path):
    anyio.run(_extract, "special-esgz", "links", str(tmp_path))
    truth = truth_layers("special-esgz")[0]
    links = tmp_path / "links"
    target, h1, h2 = (os.stat(links / n) for n in ("target", "h1", "h2"))
    # one file, three names, as the layer's tar has it
    assert target.st_ino == h1.st_ino == h2.st_ino and target.st_nlink == 3
    assert (links / "h1").read_bytes() == truth["links/target"]["data"]
    # every entry's mtime is the tar's, not the time of extraction
    checked = 0
    for path, rec in truth.items():
        if not (path == "links" or path.startswith("links/")):
            continue
        st = os.stat(tmp_path / path, follow_symlinks=False)
        assert int(st.st_mtime) == rec["mtime"], (path, st.st_mtime, rec["mtime"])
        checked += 1
    assert checked >= 6  # the dir, its files, links and symlinks
