"""Writes small OCI image layouts for tests from layer blobs made in the test
(by tests/zstdchunked_writer.py, core's writers, or plain tar/gzip), with the
media types and annotations the test chooses."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Layer:
    blob: bytes
    diff_id: str
    media_type: str = ZSTD_LAYER
    annotations: dict = field(default_factory=dict)


def _put(root: str, data: bytes) -> tuple[str, int]:
    d = hashlib.sha256(data).hexdigest()
    path = os.path.join(root, "blobs", "sha256", d)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def write_layout(root: str, tag: str, layers: list[Layer], *,
                 manifest_type: str = OCI_MANIFEST, config_type: str = OCI_CONFIG,
                 config_extra: dict | None = None) -> str:
    """Add image ``tag`` (these layers, bottom first) to the layout at
    ``root`` (created or extended); returns the manifest digest."""
    os.makedirs(root, exist_ok=True)
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
              **(config_extra or {})}
    cfg_d, cfg_n = _put(root, json.dumps(config).encode())
    descs = []
    for la in layers:
        d, n = _put(root, la.blob)
        desc = {"mediaType": la.media_type, "digest": d, "size": n}
        if la.annotations:
            desc["annotations"] = la.annotations
        descs.append(desc)
    man = {"schemaVersion": 2, "mediaType": manifest_type,
           "config": {"mediaType": config_type, "digest": cfg_d, "size": cfg_n},
           "layers": descs}
    man_d, man_n = _put(root, json.dumps(man).encode())
    index_path = os.path.join(root, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": manifest_type, "digest": man_d, "size": man_n,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    with open(index_path, "w") as f:
        json.dump(index, f)
    return man_d
