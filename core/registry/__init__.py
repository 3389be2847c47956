"""OCI distribution client: auth, credentials, mirrors, manifests, blobs, listing, push.

Public surface: :class:`RegistryClient` (HTTP + auth + retries, catalog/tags
listing), :class:`RegistryStore` (the ``ImageStore`` for registries),
:class:`RegistryBlobSource` (lazy Range reads), :func:`push_oci_layout`,
:mod:`.credentials` (lookup/store/delete) and :mod:`.config` (mirrors,
insecure registries).
"""

from .api import list_repositories, list_tags, login, logout
from .auth import Challenge, parse_www_authenticate, repository_scope
from .client import RegistryClient
from .config import RegistryConfig, load_config
from .credentials import Credentials
from .push import push_blob, push_manifest, push_oci_layout
from .store import RegistryBlobSource, RegistryStore

__all__ = [
    "Challenge", "Credentials", "list_repositories", "list_tags", "login", "logout", "RegistryBlobSource", "RegistryClient", "RegistryConfig",
    "RegistryStore", "load_config", "parse_www_authenticate", "push_blob", "push_manifest",
    "push_oci_layout", "repository_scope",
]
