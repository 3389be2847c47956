"""Registry credentials: the system keyring first, then the files other tools write.

Lookup order (:func:`lookup`), first match wins:

1. our keyring entry (service ``stargz-tui``, key = the registry's credential key);
2. containers' ``auth.json``: ``$REGISTRY_AUTH_FILE``,
   ``$XDG_RUNTIME_DIR/containers/auth.json``, ``$XDG_CONFIG_HOME/containers/auth.json``
   (keys may be a host or a namespace such as ``quay.io/org/repo``; the most
   specific key wins);
3. docker's ``config.json`` (``$DOCKER_CONFIG/config.json`` or
   ``~/.docker/config.json``): ``credHelpers`` for the host, ``auths`` entries
   (``auth`` base64 or ``username``/``password``, ``identitytoken``), then
   ``credsStore`` — helpers are run as ``docker-credential-<name> get``.

A username of ``<token>`` means the secret is an identity (OAuth2 refresh)
token. The keyring is touched only when a request needs credentials, or on
login/logout. Secrets never appear in ``repr()``, logs or error messages.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field

from ..errors import CredentialStoreError
from ..paths import containers_auth_files, docker_config_file
from ..reference import DOCKER_HUB, DOCKER_HUB_CREDENTIAL_KEY

log = logging.getLogger(__name__)

KEYRING_SERVICE = "stargz-tui"
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 20.0


@dataclass(frozen=True)
class Credentials:
    """A username and secret (password or token), and where they came from."""

    username: str
    secret: str = field(repr=False)
    source: str = ""

    @property
    def is_identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def credential_key(registry: str) -> str:
    return DOCKER_HUB_CREDENTIAL_KEY if registry == DOCKER_HUB else registry


def _normalise_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; strip scheme and trailing ``/``."""
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix):]
    k = k.rstrip("/")
    if k.endswith("/v1") or k.endswith("/v2"):
        k = k[:-3]
    host, _, rest = k.partition("/")
    if host in ("index.docker.io", "registry-1.docker.io", "docker.io"):
        host = DOCKER_HUB
    return host + ("/" + rest if rest else "")


# -- keyring ------------------------------------------------------------------------

_REFUSED_BACKENDS = ("fail", "null", "plaintext", "unencrypted")


def _backend_name(backend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__name__}"


def _acceptable(backend) -> bool:
    name = _backend_name(backend).lower()
    if any(word in name for word in _REFUSED_BACKENDS):
        return False
    if "chainer" in name:
        return False
    try:
        return float(backend.priority) > 0
    except Exception:  # noqa: BLE001 - a backend whose priority check fails is unusable
        return False


def secure_backend():
    """The keyring backend to store secrets in, or raise :class:`CredentialStoreError`."""
    try:
        import keyring
        import keyring.backends.chainer
    except Exception:  # noqa: BLE001
        raise CredentialStoreError(
            "the python 'keyring' package is not installed; install it to store credentials"
        ) from None
    backend = keyring.get_keyring()
    candidates = list(getattr(backend, "backends", None) or [backend])
    for b in candidates:
        if _acceptable(b):
            return b
    names = ", ".join(_backend_name(b) for b in candidates) or "none"
    raise CredentialStoreError(
        "no secure system keyring is available (found: " + names + "); install and start a "
        "Secret Service provider (e.g. apt-get install gnome-keyring dbus-x11, then run in a "
        "D-Bus session with the keyring unlocked) or configure another keyring backend; "
        "docker/podman credential files are still read"
    )


def _keyring_get(registry: str) -> Credentials | None:
    try:
        backend = secure_backend()
        raw = backend.get_password(KEYRING_SERVICE, credential_key(registry))
    except CredentialStoreError:
        return None
    except Exception as e:  # noqa: BLE001 - an unusable keyring must not break reads
        log.debug("keyring lookup failed: %s", type(e).__name__)
        return None
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        return Credentials(doc["username"], doc["secret"], "keyring")
    except (ValueError, KeyError, TypeError):
        log.debug("ignoring a malformed keyring entry for %s", registry)
        return None


def store(registry: str, creds: Credentials) -> str:
    """Save ``creds`` for ``registry`` in the system keyring; returns the backend's name."""
    backend = secure_backend()
    payload = json.dumps({"username": creds.username, "secret": creds.secret})
    try:
        backend.set_password(KEYRING_SERVICE, credential_key(registry), payload)
    except Exception as e:  # noqa: BLE001
        raise CredentialStoreError(
            f"cannot save credentials for {registry} in the keyring ({_backend_name(backend)}): "
            f"{type(e).__name__}"
        ) from None
    return _backend_name(backend)


def delete(registry: str) -> bool:
    """Remove our keyring entry for ``registry``; False if there was none."""
    backend = secure_backend()
    import keyring.errors

    key = credential_key(registry)
    try:
        if backend.get_password(KEYRING_SERVICE, key) is None:
            return False
        backend.delete_password(KEYRING_SERVICE, key)
    except keyring.errors.PasswordDeleteError:
        return False
    except Exception as e:  # noqa: BLE001
        raise CredentialStoreError(
            f"cannot remove credentials for {registry} from the keyring: {type(e).__name__}"
        ) from None
    return True


# -- containers auth.json and docker config.json ---------------------------------------

def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4 << 20))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.debug("ignoring unreadable credential file %s: %s", path, type(e).__name__)
        return None
    return doc if isinstance(doc, dict) else None


def _from_auth_entry(entry, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    user = secret = None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            log.debug("ignoring a malformed auth entry in %s", source)
            return None
    elif isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        user, secret = entry["username"], entry["password"]
    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        return Credentials(IDENTITY_TOKEN_USER, entry["identitytoken"], source)
    if user and secret is not None and (secret or user == IDENTITY_TOKEN_USER):
        return Credentials(user, secret, source)
    return None


def _candidates(registry: str, repository: str | None) -> list[str]:
    """Keys from most to least specific: host/ns/repo, host/ns, host."""
    keys = []
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            keys.append(registry + "/" + "/".join(parts[:i]))
    keys.append(registry)
    return keys


def _containers_lookup(registry: str, repository: str | None) -> Credentials | None:
    for path in containers_auth_files():
        doc = _read_json(path)
        if not doc:
            continue
        auths = {_normalise_key(k): v for k, v in (doc.get("auths") or {}).items()}
        for key in _candidates(registry, repository):
            if key in auths:
                c = _from_auth_entry(auths[key], path)
                if c:
                    return c
    return None


def run_helper(name: str, server_url: str) -> Credentials | None:
    """``docker-credential-<name> get``; None when it has nothing for ``server_url``."""
    exe = shutil.which(f"docker-credential-{name}")
    if not exe:
        log.debug("credential helper docker-credential-%s not found", name)
        return None
    try:
        p = subprocess.run([exe, "get"], input=server_url.encode(), capture_output=True,
                           timeout=HELPER_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("credential helper %s failed: %s", name, type(e).__name__)
        return None
    if p.returncode != 0:
        return None
    try:
        doc = json.loads(p.stdout)
        user, secret = doc.get("Username", ""), doc.get("Secret", "")
    except (ValueError, AttributeError):
        return None
    if not secret:
        return None
    return Credentials(user or IDENTITY_TOKEN_USER, secret, f"docker-credential-{name}")


def _docker_lookup(registry: str) -> Credentials | None:
    path = docker_config_file()
    doc = _read_json(path)
    if not doc:
        return None
    key = credential_key(registry)
    helpers = {_normalise_key(k): v for k, v in (doc.get("credHelpers") or {}).items()}
    if isinstance(helpers.get(registry), str):
        return run_helper(helpers[registry], key)
    auths = doc.get("auths") or {}
    for k, v in auths.items():
        if _normalise_key(k) == registry:
            c = _from_auth_entry(v, path)
            if c:
                return c
    store_name = doc.get("credsStore")
    if isinstance(store_name, str) and store_name:
        c = run_helper(store_name, key)
        if c is None and registry != DOCKER_HUB:
            # Some helpers store entries under the URL form.
            c = run_helper(store_name, f"https://{registry}")
        return c
    return None


def known_registries() -> list[str]:
    """Registries with credentials in docker/containers files (the keyring is not read)."""
    seen: list[str] = []
    paths = [*containers_auth_files(), docker_config_file()]
    for path in paths:
        doc = _read_json(path)
        if not doc:
            continue
        keys = list((doc.get("auths") or {}).keys()) + list((doc.get("credHelpers") or {}).keys())
        for k in keys:
            host = _normalise_key(k).split("/", 1)[0]
            if host and host not in seen:
                seen.append(host)
    return seen


def lookup(registry: str, repository: str | None = None, *,
           use_keyring: bool = True) -> Credentials | None:
    """Credentials for ``registry`` (and optionally ``repository``), or None (anonymous)."""
    if use_keyring:
        c = _keyring_get(registry)
        if c:
            return c
    return _containers_lookup(registry, repository) or _docker_lookup(registry)
