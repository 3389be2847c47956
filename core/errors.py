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


class AuthError(RegistryError):
    """Credentials are missing, wrong, or a token could not be obtained."""


class CredentialStoreError(CoreError):
    """The keyring (or another credential store) cannot be used."""


class MountError(CoreError):
    """Mounting, unmounting or talking to a mount daemon failed."""


class ExtractError(CoreError):
    """Extraction would write through a link or replace what it must not."""
