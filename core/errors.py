"""Exceptions raised by the core.

Every error a user can cause or meet (bad reference, missing tag, corrupt
blob, registry trouble) derives from :class:`CoreError`, whose message is one
clear sentence: the CLI prints ``str(err)`` on one line and exits non-zero.
"""


class CoreError(Exception):
    """Base of every user-facing core error; ``str()`` is a one-line message."""


class ReferenceError_(CoreError):
    """An image reference could not be parsed."""


class NotFoundError(CoreError):
    """A tag, manifest, blob, path or layer does not exist."""


class FormatError(CoreError):
    """A blob, footer, TOC, manifest or config is malformed or unsupported."""


class DigestMismatchError(CoreError):
    """Content does not hash to the digest it was addressed or annotated by."""


class ChunkDigestError(DigestMismatchError):
    """A chunk's decompressed bytes do not match its ``chunkDigest``."""


class BlobReadError(CoreError):
    """Bytes of a blob could not be read (I/O, network, short read)."""


class RegistryError(CoreError):
    """A registry answered with an error or could not be reached."""


class RegistryUnreachableError(RegistryError):
    """The registry did not answer at all (connection refused or reset, no
    route, timeouts), after the retries; not raised for TLS failures, which
    are the registry (or something in between) answering wrongly."""


class AuthError(RegistryError):
    """Credentials are missing, wrong, or a token could not be obtained."""


class CredentialStoreError(CoreError):
    """The keyring (or another credential store) cannot be used."""


class MountError(CoreError):
    """Mounting, unmounting or talking to a mount daemon failed."""


class ExtractError(CoreError):
    """Extraction would write through a link or replace what it must not."""


class CredentialsRejectedError(AuthError):
    """The registry (or its token service) refused the credentials we sent:
    asking again with the same ones cannot help."""


class RequestTimeoutError(RegistryError):
    """A registry request (with its retries, redirects and body) did not
    complete within its total deadline."""


class InsecureRedirectError(RegistryError):
    """A registry redirected to plain HTTP on a host that may not use it."""
