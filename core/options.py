"""Typed mount options, built once at the edge and passed down as they are.

Contract:

* :class:`MountOptions` is what the user asked for (``stargz-tui mount``'s
  flags, the app's mount dialog). The CLI, the app and the mount service
  build it once (:meth:`MountOptions.build`: relative paths made absolute
  against the caller's working directory, ``oci:`` layouts too), and every
  later step reads its fields; it crosses the service socket as it is
  (msgspec JSON), never as argv or environment.
* :class:`Tuning` holds the knobs that used to be read from ``os.environ``
  deep in the core (the memory LRU, O_DIRECT pack writes, the FUSE loop's
  polling window, bulk range reads). :meth:`Tuning.from_env` reads them
  once, at the edge (the process the user runs), into the options.
* :class:`DaemonConfig` is one daemon's whole configuration (a layer
  daemon, :mod:`core.daemon`, or with ``merged`` the daemon serving an
  image's whole merged tree, :mod:`core.mergeddaemon`):
  :mod:`core.mount` derives it from the options and the mount record,
  :mod:`core.starter` hands it to the daemon in one serialized form
  (:func:`encode_config`), and the daemon reads nothing else
  (no argv flags, no environment). The mount record keeps it, so a
  supervisor can start the same daemon again after a crash or a reboot.

Imports only msgspec and ``core.errors`` at start-up (the CLI builds options
before it knows whether the mount service answers).
"""

from __future__ import annotations

import logging
import os

import msgspec

from .errors import MountError
from .optionfields import DEFAULT_READY_TIMEOUT, absolute_image, mount_fields

DEFAULT_SPIN_US = 50.0  # core.fuseloop's default polling window


def _size(name: str, text: str) -> int | None:
    """``64M``, ``2G``, ``4096``: bytes (core.units.parse_size, imported only
    when the variable is set), or None (the default, said in one line) when
    unreadable."""
    from .units import parse_size

    try:
        return max(0, parse_size(text))
    except ValueError:
        _ignored(name, text, "a size such as 64M")
        return None


def _ignored(name: str, text: str, wanted: str) -> None:
    # a tuning knob never stops a mount: one line says it is not used
    logging.getLogger("core.options").warning(
        "stargz-tui: %s=%r is not %s; using the default", name, text, wanted)


class Tuning(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Performance knobs of a mount's daemons (defaults: the core's)."""

    memory_cache: int | None = None  # bytes of the memory LRU; None: RAM/64 clamped
    cache_direct: bool = True  # O_DIRECT writes of cache packs
    fuse_spin_us: float = DEFAULT_SPIN_US  # FUSE loop polling window (0: off)
    bulk_reads: bool = True  # large ranges through core.registry.bulk

    @classmethod
    def from_env(cls, environ=None) -> Tuning:
        """``STARGZ_TUI_MEMORY_CACHE`` (e.g. ``64M``), ``STARGZ_TUI_CACHE_DIRECT``
        (``0``: off), ``STARGZ_TUI_FUSE_SPIN_US`` (µs, 0..1000),
        ``STARGZ_TUI_BULK_READS`` (``0``: off): read here, once, by the process
        the user started."""
        env = os.environ if environ is None else environ
        mem_text = env.get("STARGZ_TUI_MEMORY_CACHE")
        mem = _size("STARGZ_TUI_MEMORY_CACHE", mem_text) if mem_text else None
        spin_text = env.get("STARGZ_TUI_FUSE_SPIN_US")
        try:
            spin = float(spin_text or DEFAULT_SPIN_US)
        except ValueError:
            _ignored("STARGZ_TUI_FUSE_SPIN_US", spin_text, "a number of microseconds")
            spin = DEFAULT_SPIN_US
        return cls(memory_cache=mem, cache_direct=env.get("STARGZ_TUI_CACHE_DIRECT", "1") != "0",
                   fuse_spin_us=min(max(spin, 0.0), 1000.0),
                   bulk_reads=env.get("STARGZ_TUI_BULK_READS") != "0")


class MountOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One mount as asked for. Paths are absolute (:meth:`build`)."""

    image: str
    mountpoint: str
    layer: str | None = None  # index or digest: one raw layer; None: the merged image
    platform: str | None = None
    prefetch: bool = True
    background_fetch: bool = True
    wait_prefetch: bool = False
    allow_other: bool = False
    allow_unverified: bool = False
    cache_dir: str | None = None
    cache_size: int | None = None
    debug: bool = False
    silence: float | None = None
    prefetch_size: int = 0
    read_timeout: float | None = None
    insecure_registries: tuple[str, ...] = ()
    map_owner: bool = False
    uid_map: tuple[str, ...] = ()
    gid_map: tuple[str, ...] = ()
    record: str | None = None
    force: bool = False
    timeout: float = DEFAULT_READY_TIMEOUT
    tuning: Tuning = Tuning()

    @classmethod
    def build(cls, image: str, mountpoint: str, *, layer=None, cwd: str | None = None,
              tuning: Tuning | None = None, **fields) -> MountOptions:
        """The options with every path absolute against ``cwd`` (default: ours;
        :func:`core.optionfields.mount_fields`) and the tuning from this
        process's environment unless given. Unknown option names raise
        ``MountError``."""
        try:
            return cls(**mount_fields(image, mountpoint, layer=layer, cwd=cwd, **fields),
                       tuning=tuning if tuning is not None else Tuning.from_env())
        except TypeError as e:
            raise MountError(f"bad mount option: {e}") from None


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one daemon (:mod:`core.daemon`, or :mod:`core.mergeddaemon`
    with ``merged``) needs."""

    image: str
    layer: str  # index or digest (ignored with ``merged``: every layer is served)
    mountpoint: str
    control: str  # its control socket
    log: str  # its log file
    image_file: str | None = None  # the resolved image: read when there, else written
    cache_dir: str | None = None
    cache_size: int | None = None
    prefetch: bool = True
    background_fetch: bool = True
    prefetch_size: int = 0
    wait_prefetch: bool = False
    pre_resolve: bool = True  # resolve the image's other layers in the background
    allow_other: bool = False
    allow_unverified: bool = False
    silence: float | None = None
    attr_timeout: float | None = None  # None: core.fusefs.IMMUTABLE_TIMEOUT (a layer never changes)
    resolve_timeout: float = 30.0
    read_timeout: float | None = None
    platform: str | None = None
    insecure_registries: tuple[str, ...] = ()
    fsname: str = "stargz"
    opaque_xattrs: str = "both"  # both | trusted | user
    uid_map: tuple[str, ...] = ()
    gid_map: tuple[str, ...] = ()
    record: str | None = None
    debug: bool = False
    tuning: Tuning = Tuning()
    merged: bool = False  # serve the image's merged tree (core.mergeddaemon), not one layer


_config_decoder = msgspec.json.Decoder(DaemonConfig)


def encode_config(config: DaemonConfig) -> bytes:
    return msgspec.json.encode(config)


def decode_config(data: bytes) -> DaemonConfig:
    """The config a starter sent; ``MountError`` (one line) when it is not one."""
    try:
        return _config_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise MountError(f"bad daemon config: {e}") from None


def to_builtins(obj) -> dict:
    """A struct as JSON-able data (for the mount record)."""
    return msgspec.to_builtins(obj)


def config_from_builtins(data) -> DaemonConfig:
    try:
        return msgspec.convert(data, DaemonConfig)
    except msgspec.ValidationError as e:
        raise MountError(f"bad daemon config in the mount record: {e}") from None


def options_from_builtins(data) -> MountOptions:
    try:
        return msgspec.convert(data, MountOptions)
    except msgspec.ValidationError as e:
        raise MountError(f"bad mount options: {e}") from None


__all__ = ["MountOptions", "DaemonConfig", "Tuning", "encode_config", "decode_config",
           "to_builtins", "config_from_builtins", "options_from_builtins", "absolute_image"]
