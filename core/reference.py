"""Image references, normalised the way containerd and skopeo spell them.

Two transports:

* registry references: ``ubuntu``, ``ubuntu:22.04``, ``ghcr.io/org/app@sha256:...``,
  ``localhost:5000/repo:tag@sha256:...`` (optionally prefixed ``docker://``).
  Docker Hub short names gain ``docker.io/library/`` and ``:latest``.
* OCI layouts: ``oci:DIR[:TAG]`` or ``oci:DIR@sha256:...`` as skopeo spells them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import ReferenceError_

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# The key docker's config.json and credential helpers use for Docker Hub.
DOCKER_HUB_CREDENTIAL_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    ``transport`` is ``"docker"`` (a registry) or ``"oci"`` (a local layout).
    For ``oci``, ``layout_dir`` is set and ``registry``/``repository`` are empty.
    """

    transport: str
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    layout_dir: str = ""

    @property
    def is_oci_layout(self) -> bool:
        return self.transport == "oci"

    @property
    def api_host(self) -> str:
        """The host to send distribution API requests to."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def credential_key(self) -> str:
        """The key credentials are stored under (docker's convention for Hub)."""
        return DOCKER_HUB_CREDENTIAL_KEY if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.transport, self.registry, self.repository, tag, None, self.layout_dir)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.transport, self.registry, self.repository, self.tag, digest, self.layout_dir)

    def __str__(self) -> str:
        if self.is_oci_layout:
            s = f"oci:{self.layout_dir}"
            if self.tag:
                s += f":{self.tag}"
            if self.digest:
                s += f"@{self.digest}"
            return s
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_loopback_host(host: str) -> bool:
    """True for hosts that never leave the machine (plain HTTP is allowed there):
    a literal IPv4 address in 127.0.0.0/8, the IPv6 address ``::1`` (``[::1]``)
    or exactly ``localhost``, each with an optional ``:port``.

    Names are never judged by their spelling: ``127.attacker.example`` or
    ``x.localhost`` resolve wherever DNS says, so they get TLS like any host."""
    h = host.strip()
    if h.startswith("["):
        inner, sep, rest = h[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
        h = inner
    elif h.count(":") == 1:
        h, _, port = h.partition(":")
        if not port.isdigit():
            return False
    if h.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if ip.version == 4:
        return ip in _LOOPBACK_V4
    return ip == _LOOPBACK_V6


_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


def _parse_oci(rest: str) -> Reference:
    if not rest:
        raise ReferenceError_("empty OCI layout path in reference 'oci:'")
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ReferenceError_(f"invalid digest '{digest}' in OCI reference")
    tag = None
    # oci:DIR:TAG; a ':' inside the last path component is the tag separator.
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail and head:
        rest, tag = head, tail
        if not tag:
            raise ReferenceError_("empty tag in OCI reference")
    return Reference("oci", tag=tag, digest=digest, layout_dir=rest)


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raises :class:`ReferenceError_` with a clear message."""
    s = text.strip()
    if not s:
        raise ReferenceError_("empty image reference")
    if s.startswith("oci:"):
        return _parse_oci(s[4:])
    if s.startswith("docker://"):
        s = s[len("docker://"):]
    digest = None
    if "@" in s:
        s, digest = s.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ReferenceError_(f"invalid digest '{digest}' in reference '{text}'")
        digest = digest.lower() if digest.startswith("sha256:") else digest
    tag = None
    last = s.rsplit("/", 1)[-1]
    if ":" in last:
        s, tag = s.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"invalid tag '{tag}' in reference '{text}'")
    parts = s.split("/", 1)
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"
                            or parts[0].startswith("[")):
        registry, repo = parts
        if not _HOST_RE.match(registry):
            raise ReferenceError_(f"invalid registry host '{registry}' in reference '{text}'")
    else:
        registry, repo = DOCKER_HUB, s
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if not repo or not _REPO_RE.match(repo):
        raise ReferenceError_(
            f"invalid repository name '{repo}' in reference '{text}' (lowercase letters, digits, . _ - /)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference("docker", registry, repo, tag, digest)


def parse_registry(text: str) -> str:
    """Normalise a registry name as typed by a user (``docker.io``, ``localhost:5000``, a URL)."""
    s = text.strip()
    for prefix in ("https://", "http://"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    s = s.split("/", 1)[0]
    if not s or not _HOST_RE.match(s):
        raise ReferenceError_(f"invalid registry '{text}'")
    if s in ("index.docker.io", "registry-1.docker.io"):
        return DOCKER_HUB
    return s.lower()
