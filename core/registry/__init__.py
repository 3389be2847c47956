"""The OCI distribution side: client (requests, retries), auth, credentials, config
(mirrors, insecure hosts), store and blob source (reads), bulk transport, push, api.
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
