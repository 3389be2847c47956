"""Registry configuration: mirrors per registry and insecure (plain HTTP) registries.

The file is TOML, at ``$STARGZ_TUI_REGISTRIES_CONFIG`` or
``<platformdirs user_config_dir("stargz-tui")>/registries.toml``::

    # Plain HTTP (or unverified TLS) for these hosts; loopback hosts never need it.
    insecure-registries = ["registry.lan:5000"]
    # Seconds one request (retries, redirects and body included) may take
    # before it fails (default 60; ``--timeout`` overrides it).
    request-timeout = 60

    [registries."docker.io"]
    # Tried in order for manifests and blobs, then the registry itself.
    mirrors = ["mirror.gcr.io", "http://127.0.0.1:5001"]

    [registries."registry.lan:5000"]
    insecure = true

    [registries."localhost:5443"]
    # A loopback registry that serves TLS (loopback hosts default to HTTP).
    tls = true

A mirror is ``host[:port]`` (HTTPS; HTTP for loopback or insecure hosts) or a
URL with an explicit ``http://``/``https://`` scheme. Blobs are
content-addressed, so any mirror that serves the right digest is fine; a
mirror that fails or lacks the content is skipped (in the spirit of
containerd's ``hosts.toml`` and containers' ``registries.conf``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from ..errors import CoreError
from ..paths import registries_config_file
from ..reference import is_loopback_host, parse_registry

CONFIG_ENV = "STARGZ_TUI_REGISTRIES_CONFIG"


class RegistryConfigError(CoreError):
    """The registries configuration file is malformed."""


def config_path() -> str:
    """``$STARGZ_TUI_REGISTRIES_CONFIG`` or the user config dir's
    ``registries.toml`` (read by :mod:`core.paths`, where locations are)."""
    return registries_config_file(CONFIG_ENV)


@dataclass
class RegistryConfig:
    """Mirrors and insecure registries (see the module docstring)."""

    mirrors: dict[str, list[str]] = field(default_factory=dict)
    insecure: set[str] = field(default_factory=set)
    path: str | None = None
    tls: set[str] = field(default_factory=set)
    request_timeout: float | None = None  # seconds; None: the client's default

    def is_insecure(self, host: str) -> bool:
        h = host.lower()
        return h in self.insecure or h.rsplit(":", 1)[0] in self.insecure

    def mirrors_for(self, registry: str) -> list[str]:
        return list(self.mirrors.get(registry.lower(), []))

    def base_url(self, host_or_url: str) -> str:
        """The base URL (scheme://host[:port]) for a registry or mirror entry."""
        s = host_or_url.rstrip("/")
        if s.startswith(("http://", "https://")):
            return s
        plain = (is_loopback_host(s) and s.lower() not in self.tls) or self.is_insecure(s)
        return f"{'http' if plain else 'https'}://{s}"

    def with_insecure(self, hosts) -> RegistryConfig:
        extra = {parse_registry(h) for h in (hosts or ())}
        return RegistryConfig(dict(self.mirrors), set(self.insecure) | extra, self.path,
                              set(self.tls), self.request_timeout)


def load_config(path: str | None = None) -> RegistryConfig:
    """Read the configuration; a missing file is an empty configuration."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return RegistryConfig(path=path)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RegistryConfigError(f"cannot read registry configuration {path}: {e}") from None
    cfg = RegistryConfig(path=path)
    timeout = doc.get("request-timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise RegistryConfigError(f"{path}: request-timeout must be a positive number of "
                                      "seconds")
        cfg.request_timeout = float(timeout)
    insecure = doc.get("insecure-registries", [])
    if not isinstance(insecure, list) or not all(isinstance(h, str) for h in insecure):
        raise RegistryConfigError(f"{path}: insecure-registries must be a list of hosts")
    try:
        cfg.insecure |= {parse_registry(h) for h in insecure}
        regs = doc.get("registries", {})
        if not isinstance(regs, dict):
            raise RegistryConfigError(f"{path}: [registries] must be a table")
        for name, table in regs.items():
            if not isinstance(table, dict):
                raise RegistryConfigError(f"{path}: registries.{name} must be a table")
            reg = parse_registry(name)
            mirrors = table.get("mirrors", [])
            if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
                raise RegistryConfigError(f"{path}: registries.{name}.mirrors must be a list")
            if mirrors:
                cfg.mirrors[reg] = [m.rstrip("/") for m in mirrors]
            if table.get("insecure") is True:
                cfg.insecure.add(reg)
            if table.get("tls") is True:
                cfg.tls.add(reg)
    except CoreError as e:
        if isinstance(e, RegistryConfigError):
            raise
        raise RegistryConfigError(f"{path}: {e}") from None
    return cfg
