"""Images shaped like real registries' (issue 12, point 6), built in the test
and pushed to the loopback registry through its plain HTTP API (monolithic
blob uploads, manifest PUTs), so shapes our own push code would not write
(a manifest whose foreign layer's blob is absent, Docker manifest lists,
indexes with attestation manifests) reach the registry as-is."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MTIME = 1700000000


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(*members) -> bytes:
    """A PAX tar of ``(name, data_or_None, attrs)`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name, data, attrs in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data or b"")
            ti.mode = attrs.pop("mode", 0o755 if attrs.get("type") == tarfile.DIRTYPE else 0o644)
            ti.mtime = MTIME
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def d(name: str, **attrs):
    return (name, None, {"type": tarfile.DIRTYPE, **attrs})


def f(name: str, data: bytes = b"", **attrs):
    return (name, data, attrs)


class RawPusher:
    """Pushes blobs and manifests to ``registry_url`` with plain HTTP calls."""

    def __init__(self, registry_url: str):
        self.url = registry_url
        self.http = httpx.Client(timeout=30)

    def close(self) -> None:
        self.http.close()

    def blob(self, repo: str, data: bytes) -> str:
        dg = digest_of(data)
        r = self.http.post(f"{self.url}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["location"]
        if loc.startswith("/"):
            loc = self.url + loc
        sep = "&" if "?" in loc else "?"
        r = self.http.put(f"{loc}{sep}digest={dg}", content=data,
                          headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return dg

    def manifest(self, repo: str, ref: str, doc: dict) -> tuple[str, int, str]:
        body = json.dumps(doc).encode()
        r = self.http.put(f"{self.url}/v2/{repo}/manifests/{ref}", content=body,
                          headers={"Content-Type": doc["mediaType"]})
        r.raise_for_status()
        return digest_of(body), len(body), doc["mediaType"]

    def image(self, repo: str, ref: str, layers: list[dict], *, docker: bool = False,
              arch: str = "amd64", push_blobs: bool = True) -> tuple[str, int, str]:
        """An image of ``layers`` (``{"tar": bytes}`` or a ready descriptor
        with ``"descriptor"``; ``"blob"`` overrides the gzip of the tar)."""
        descs, diff_ids = [], []
        for la in layers:
            if "descriptor" in la:
                descs.append(la["descriptor"])
                diff_ids.append(la["diff_id"])
                continue
            blob = la.get("blob") or gzip.compress(la["tar"], mtime=0)
            if push_blobs:
                self.blob(repo, blob)
            desc = {"mediaType": la.get("media_type") or (DOCKER_GZIP if docker else OCI_GZIP),
                    "digest": digest_of(blob), "size": len(blob)}
            if la.get("annotations"):
                desc["annotations"] = la["annotations"]
            descs.append(desc)
            diff_ids.append(la.get("diff_id") or digest_of(la["tar"]))
        cfg = json.dumps({"architecture": arch, "os": "linux",
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        self.blob(repo, cfg)
        doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
               "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                          "digest": digest_of(cfg), "size": len(cfg)},
               "layers": descs}
        return self.manifest(repo, ref, doc)

    def index(self, repo: str, ref: str, entries: list[tuple[tuple[str, int, str], dict, dict]],
              *, docker: bool = False) -> tuple[str, int, str]:
        """An index of ``(manifest, platform, annotations)`` entries."""
        manifests = []
        for (dg, size, mt), platform, ann in entries:
            m = {"mediaType": mt, "digest": dg, "size": size, "platform": platform}
            if ann:
                m["annotations"] = ann
            manifests.append(m)
        return self.manifest(repo, ref, {"schemaVersion": 2,
                                         "mediaType": DOCKER_LIST if docker else OCI_INDEX,
                                         "manifests": manifests})
