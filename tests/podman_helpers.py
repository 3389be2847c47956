"""Debian's podman as a test producer of zstd:chunked images.

:class:`Podman` runs the real ``podman`` binary as root with the ``vfs``
storage driver and its own storage.conf, registries.conf, containers.conf and
signature policy under a temp dir: no system service, no system storage, no
network but the loopback registry the test names. Images come in from the
fixture OCI layout (``podman pull oci:DIR:TAG``) and go out with ``podman
push --compression-format zstd:chunked``, which is how podman users publish
zstd:chunked images; what it writes is the ground truth for containers/storage's
older generation (``io.containers.zstd-chunked.*``, 48-byte footer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import httpx

PODMAN = shutil.which("podman") or "/usr/bin/podman"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Podman:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.root = os.path.join(workdir, "root")
        # podman refuses a runroot path longer than 50 characters.
        self.runroot = tempfile.mkdtemp(prefix="sgz-pm-")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.runroot, exist_ok=True)
        self.policy = self._write("policy.json", json.dumps(
            {"default": [{"type": "insecureAcceptAnything"}]}))
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": self._write("storage.conf", (
                f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\n'
                f'graphroot = "{self.root}"\n')),
            "CONTAINERS_REGISTRIES_CONF": self._write(
                "registries.conf", "unqualified-search-registries = []\n"),
            # No journald/systemd on a CI runner: events to nowhere, plain cgroupfs.
            "CONTAINERS_CONF": self._write("containers.conf", (
                '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')),
            "XDG_CONFIG_HOME": os.path.join(workdir, "config"),
        }

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run(self, *args: str, timeout: float = 180) -> str:
        cmd = [PODMAN, "--root", self.root, "--runroot", self.runroot,
               "--storage-driver", "vfs", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
        return p.stdout

    def pull(self, source: str, *, tls_verify: bool = True) -> str:
        """Pull ``source`` (``oci:DIR:TAG`` or a registry reference); the image id."""
        extra = [] if tls_verify else ["--tls-verify=false"]
        out = self.run("pull", "--quiet", "--signature-policy", self.policy, *extra, source)
        return out.strip().splitlines()[-1]

    def push(self, image: str, dest: str, compression: str = "zstd:chunked") -> None:
        self.run("push", "--signature-policy", self.policy, "--tls-verify=false",
                 "--compression-format", compression, image, dest)


def get_manifest(registry_url: str, repo: str, ref: str) -> dict:
    r = httpx.get(f"{registry_url}/v2/{repo}/manifests/{ref}",
                  headers={"Accept": OCI_MANIFEST}, timeout=10)
    r.raise_for_status()
    return r.json()


def put_manifest(registry_url: str, repo: str, tag: str, manifest: dict) -> None:
    body = json.dumps(manifest).encode()
    r = httpx.put(f"{registry_url}/v2/{repo}/manifests/{tag}", content=body,
                  headers={"Content-Type": manifest.get("mediaType", OCI_MANIFEST)}, timeout=10)
    r.raise_for_status()
