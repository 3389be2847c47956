"""The network faults of test_network_faults with every range read going through
the bulk reader first (core.registry.bulk; normally only ranges of 1 MiB and
more do): a fault met by a bulk read must end in the regular path's outcome
(the right bytes after its retries, or its clear error), never wrong bytes."""

from __future__ import annotations

import time

import anyio
import pytest
from faultproxy import FaultProxy
from test_network_faults import BLOBS, CORE_FAULTS, TRUTH, judge_reads

from core.errors import CoreError
from core.estargz import load_layer_index, read_file_range
from core.image import open_image
from core.reference import parse_reference
from core.registry.store import RegistryBlobSource, RegistryStore

pytestmark = [pytest.mark.reliability, pytest.mark.registry]

# Blob faults; "forever" is left out: once the index is loaded every file read
# would fail its full retry budget (the regular path's case, tested there).
BLOB_FAULTS = [f for f in CORE_FAULTS if f[1].get("path") == BLOBS and f[1].get("count") != 1000]


@pytest.fixture
def counted_bulk(monkeypatch):
    """Every range read tries the bulk reader; returns the count of bulk reads."""
    monkeypatch.setattr(RegistryBlobSource, "bulk_min", 1)
    seen = {"bulk": 0}
    orig = RegistryBlobSource._bulk

    async def bulk(self, offset, length):
        data = await orig(self, offset, length)
        if data is not None:
            seen["bulk"] += 1
        return data

    monkeypatch.setattr(RegistryBlobSource, "_bulk", bulk)
    return seen


async def _read_all_then_fault(ref: str, proxy: FaultProxy, kind: str, kw: dict):
    """Open the image and its index (regular reads: the source learns the blob
    URL), then inject the fault and read every file of layer 0 (bulk first)."""
    r = parse_reference(ref)
    store = RegistryStore(r, use_keyring=False, timeout=2.0, max_attempts=3, backoff=0.05,
                          max_backoff=0.5, max_retry_time=20)
    try:
        img = await open_image(r, store=store)
        d = img.layers[0]
        src = store.blob_source(d.digest, d.size)
        ix = await load_layer_index(src, expected_toc_digest=d.toc_digest_annotation)
        proxy.add(kind, **kw)
        out = {}
        for path in TRUTH:
            try:
                out[path] = await read_file_range(ix, src, ix.lookup(path))
            except CoreError as err:
                out[path] = err
        bulk = store.client.bulk_reader()
        return out, None, dict(bulk.stats)
    except CoreError as e:
        return {}, e, {}
    finally:
        await store.aclose()


@pytest.mark.parametrize("kind,kw,tried,must", BLOB_FAULTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BLOB_FAULTS)])
def test_bulk_reads_under_fault(proxy, registry, isolated_env, counted_bulk, kind, kw, tried,
                                must, rel):
    t0 = time.monotonic()
    out, err, stats = anyio.run(_read_all_then_fault, f"{proxy.host}/fixtures/mini:mini-esgz",
                                proxy, kind, kw)
    result = judge_reads(out, err, must, tried, time.monotonic() - t0)
    if must is True:
        assert counted_bulk["bulk"] > 0, "no read went through the bulk reader"
    assert len(proxy.faults()) >= 1, "the fault was never injected"
    if kind != "corrupt":  # a corrupt body looks right to the bulk reader
        assert stats.get("fallbacks", 0) >= 1, "no bulk read met the fault"
    rel.row("network", f"core, bulk range reads: {tried}",
            f"no wrong bytes; {result}; {counted_bulk['bulk']} bulk reads, "
            f"{stats.get('fallbacks', 0)} fell back")
