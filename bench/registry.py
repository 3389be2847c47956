"""A loopback ``docker-registry`` for the benchmarks, a monolithic-upload
pusher, and registry-side byte counting.

Bytes fetched are counted from the registry's own log: distribution logs
``http.response.written=N`` for every response it completes, so counting
costs nothing on the data path (a counting proxy would sit in the middle of
the throughput figures). A response still streaming is counted when it ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time

import httpx

_WRITTEN = re.compile(r'http\.response\.written=(\d+)')
_METHOD = re.compile(r'http\.request\.method=(\w+)')

CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """``docker-registry`` on 127.0.0.1:PORT storing under ``root``."""

    def __init__(self, root: str, logdir: str):
        self.root = root
        self.logdir = logdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(logdir, "registry.log")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 20.0) -> None:
        exe = shutil.which("docker-registry")
        if not exe:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.logdir, exist_ok=True)
        cfg = os.path.join(self.logdir, "registry.yml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(root=self.root, port=self.port))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "serve", cfg], stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited; see {self.log_path}")
            try:
                if httpx.get(self.url + "/v2/", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("docker-registry did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    # -- byte counting ----------------------------------------------------
    def mark(self) -> int:
        """A position in the log; :meth:`fetched_since` counts after it."""
        self._log.flush()
        return os.path.getsize(self.log_path)

    def fetched_since(self, mark: int) -> dict:
        """Bytes the registry sent (response bodies) and GET requests since ``mark``."""
        nbytes = 0
        gets = 0
        sizes = []
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if "response completed" not in line:
                    continue
                m = _WRITTEN.search(line)
                if m:
                    nbytes += int(m.group(1))
                    sizes.append(int(m.group(1)))
                mm = _METHOD.search(line)
                if mm and mm.group(1) == "GET":
                    gets += 1
        return {"bytes": nbytes, "requests": gets, "sizes": sizes}

    # -- pushing ------------------------------------------------------------
    def push_blob(self, client: httpx.Client, repo: str, digest: str, path: str | None = None,
                  data: bytes | None = None) -> None:
        r = client.head(f"{self.url}/v2/{repo}/blobs/{digest}")
        if r.status_code == 200:
            return
        r = client.post(f"{self.url}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["location"]
        if loc.startswith("/"):
            loc = self.url + loc
        sep = "&" if "?" in loc else "?"
        if path is not None:
            size = os.path.getsize(path)

            def body():
                with open(path, "rb") as f:
                    while chunk := f.read(4 << 20):
                        yield chunk

            r = client.put(f"{loc}{sep}digest={digest}", content=body(),
                           headers={"Content-Length": str(size),
                                    "Content-Type": "application/octet-stream"})
        else:
            r = client.put(f"{loc}{sep}digest={digest}", content=data,
                           headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()

    def push_image(self, repo: str, tag: str, layers: list[dict]) -> str:
        """Push a single-platform image whose layers are eStargz blobs.

        ``layers``: dicts with ``path``, ``digest``, ``size``, ``diff_id``,
        ``toc_digest``, ``uncompressed_size``. Returns the reference.
        """
        import hashlib

        config = {
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [ly["diff_id"] for ly in layers]},
        }
        cfg = json.dumps(config, separators=(",", ":")).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cfg_digest, "size": len(cfg)},
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": ly["digest"], "size": ly["size"],
                "annotations": {
                    "containerd.io/snapshot/stargz/toc.digest": ly["toc_digest"],
                    "io.containers.estargz.uncompressed-size": str(ly["uncompressed_size"]),
                },
            } for ly in layers],
        }
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        with httpx.Client(timeout=600) as client:
            for ly in layers:
                self.push_blob(client, repo, ly["digest"], path=ly["path"])
            self.push_blob(client, repo, cfg_digest, data=cfg)
            r = client.put(f"{self.url}/v2/{repo}/manifests/{tag}", content=raw,
                           headers={"Content-Type": manifest["mediaType"]})
            r.raise_for_status()
        return f"{self.host}/{repo}:{tag}"
