"""B9's report (issue 16, "bench/run reports B9 with its four lines and
bytes"): a real ``bench/run --quick --only B9 --runs 1`` (real registry,
real optimize run, real mounts and chroot runs) on the host's python3
userland (``STARGZ_BENCH_B9_ROOTFS=host``: no mmdebstrap download), checked
for the shape of what it reports, never for wall time: the four lines with
their bytes, the target and its verdict (with the note on where the time
goes when it is missed), and the same in the docs file it writes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from app_support import ROOT

pytestmark = pytest.mark.fuse

LINES = ("full pull + extract + run: ", "lazy, unoptimized: ", "lazy, optimized: ",
         "Go reader")


def test_bench_b9_reports_four_lines_with_bytes(tmp_path):
    out_json, docs = tmp_path / "b9.json", tmp_path / "benchmarks.md"
    env = dict(os.environ, STARGZ_BENCH_B9_ROOTFS="host")
    p = subprocess.run([str(ROOT / "bench" / "run"), "--quick", "--only", "B9", "--runs", "1",
                        "--no-peer", "--workdir", str(tmp_path / "work"),
                        "--json", str(out_json), "--docs", str(docs)],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "B9 failed" not in p.stderr, p.stderr[-2000:]
    (b9,) = json.loads(out_json.read_text())["results"]
    assert b9["id"] == "B9"
    ref, plain, opt = b9["reference"], b9["unoptimized"], b9["ours"]
    for got in (ref, plain, opt):
        assert got["seconds"] > 0 and got["bytes"] > 0
    # a lazy start fetches less than the whole blob; the optimized one no more
    # requests than the unoptimized (its head comes in one prefetch)
    assert opt["bytes"] < ref["bytes"] and plain["bytes"] < ref["bytes"]
    assert opt["requests"] <= plain["requests"]
    assert b9["target"].startswith("optimized lazy <= 25% of the full pull")
    assert b9["met"] == (opt["seconds"] <= 0.25 * ref["seconds"])  # (no Go reader here)
    notes = b9["notes"]
    for start in LINES:
        line = next((n for n in notes if n.startswith(start)), None)
        assert line is not None, (start, notes)
        if start != "Go reader":
            assert " MB" in line, line
    assert any(n.startswith("Go reader: not run") for n in notes)
    assert any(n.startswith("recording on the read path: ") for n in notes)
    assert any(n.startswith("target not met; where the optimized start's") for n in notes) \
        == (not b9["met"])
    # what a full run writes into docs/benchmarks.md: the row and the lines
    text = docs.read_text()
    assert "| B9 | python3 import workload" in text
    for start in LINES:
        assert f"- B9: {start}" in text
