"""Broken manifests, configs and indexes (OCI layouts crafted in tmp): a clear,
one-line refusal from the core and from `stargz-tui mount`, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anyio
import pytest
from rel_layers import sha256, simple_layer, write_layout

from core.errors import CoreError
from core.image import open_image

pytestmark = pytest.mark.reliability

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tamper_blob(root, digest, new: bytes):
    with open(os.path.join(root, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(new)


def case_manifest_digest(root):
    ref = write_layout(root, [simple_layer()])
    idx = json.load(open(os.path.join(root, "index.json")))
    d = idx["manifests"][0]["digest"]
    m = open(os.path.join(root, "blobs", "sha256", d[7:]), "rb").read()
    _tamper_blob(root, d, m.replace(b'"schemaVersion": 2', b'"schemaVersion": 2 '))
    return ref


def case_config_digest(root):
    ref = write_layout(root, [simple_layer()])
    idx = json.load(open(os.path.join(root, "index.json")))
    m = json.load(open(os.path.join(root, "blobs", "sha256", idx["manifests"][0]["digest"][7:])))
    _tamper_blob(root, m["config"]["digest"], b'{"os": "linux", "architecture": "evil"}')
    return ref


def case_no_platform(root):
    def idx(index, put):
        child = index["manifests"][0]
        inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [dict(child, platform={"os": "windows", "architecture": "arm"}),
                               dict(child, platform={"os": "plan9", "architecture": "mips"})]}
        b = json.dumps(inner).encode()
        return {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": put(b),
            "size": len(b), "annotations": {"org.opencontainers.image.ref.name": "t"}}]}
    return write_layout(root, [simple_layer()], index_override=idx)


def case_unknown_manifest_type(root):
    def man(m):
        m["mediaType"] = "application/vnd.example.unknown+json"
        return m
    return write_layout(root, [simple_layer()], manifest_override=man)


def case_unknown_layer_type(root):
    return write_layout(root, [simple_layer()], layer_media_type="application/x-unknown-blob")


def case_hostile_manifest_shapes(root):
    def man(m):
        m["layers"] = [{"digest": 5, "size": "big"}]
        m["config"]["digest"] = ["not", "a", "string"]
        return m
    return write_layout(root, [simple_layer()], manifest_override=man)


def case_hostile_config_shapes(root):
    return write_layout(root, [simple_layer()], config={"rootfs": ["x"], "os": 1})


def case_hostile_index_shapes(root):
    def idx(index, put):
        index["manifests"] = [5, {"platform": "linux", "digest": None}, index["manifests"][0]]
        return index
    return write_layout(root, [simple_layer()], index_override=idx)


def case_missing_blob(root):
    ref = write_layout(root, [simple_layer()])
    idx = json.load(open(os.path.join(root, "index.json")))
    m = json.load(open(os.path.join(root, "blobs", "sha256", idx["manifests"][0]["digest"][7:])))
    os.unlink(os.path.join(root, "blobs", "sha256", m["layers"][0]["digest"][7:]))
    return ref


CASES = {
    "manifest-digest": (case_manifest_digest, "a manifest that does not match its digest", "open"),
    "config-digest": (case_config_digest, "a config that does not match its digest", "open"),
    "no-platform": (case_no_platform, "an index with no manifest for this platform", "open"),
    "unknown-manifest-type": (case_unknown_manifest_type, "an unknown manifest media type",
                              "open"),
    "unknown-layer-type": (case_unknown_layer_type, "an unknown layer media type (blob is "
                           "valid eStargz with a matching TOC digest)", "any"),
    "hostile-manifest": (case_hostile_manifest_shapes, "manifest fields of the wrong JSON types",
                         "open"),
    "hostile-config": (case_hostile_config_shapes, "config fields of the wrong JSON types", "any"),
    "hostile-index": (case_hostile_index_shapes, "index entries of the wrong JSON types", "any"),
    "missing-blob": (case_missing_blob, "a layer blob missing from the layout", "mount"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_image(case, tmp_path, rel):
    build, tried, where = CASES[case]
    ref = build(str(tmp_path / "layout"))
    core_result = "opened"
    try:
        anyio.run(open_image, ref)
    except CoreError as e:
        assert "\n" not in str(e)
        core_result = f"{type(e).__name__}: {str(e)[:100]}"
    if where == "open":
        assert core_result != "opened", f"{case}: open_image accepted it"
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = dict(os.environ, STARGZ_TUI_STATE_DIR=str(tmp_path / "s"),
               STARGZ_TUI_CACHE_DIR=str(tmp_path / "c"), STARGZ_TUI_RUNTIME_DIR=str(tmp_path / "r"))
    r = subprocess.run([sys.executable, "-m", "stargz_tui", "mount", "--layer", "0", ref, str(mp)],
                       capture_output=True, text=True, timeout=90, cwd=ROOT, env=env)
    if r.returncode == 0:
        subprocess.run([sys.executable, "-m", "stargz_tui", "unmount", "--force", str(mp)],
                       capture_output=True, timeout=60, cwd=ROOT, env=env)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    if where in ("open", "mount"):
        assert r.returncode != 0 and len(err.splitlines()) == 1, (case, r.returncode, err)
    rel.row("image", tried, f"core: {core_result}; mount: "
            + (f"exit {r.returncode}, '{err[:100]}'" if r.returncode else "mounted (harmless)"))
    assert sha256
