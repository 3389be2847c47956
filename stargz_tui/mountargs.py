"""``stargz-tui mount``'s options, defined once.

Contract: :data:`MOUNT_FLAGS` is the one table of ``mount``'s flags: the
argparse parser (:mod:`stargz_tui.commands.mount`) is built from it, and so
is the fast client's parser (:mod:`stargz_tui.mountclient`), which reads
the common command lines without argparse and hands everything else
(``--help``, a flag not in this table, a value it cannot read) to the full
parser. :func:`fields_from` maps parsed values, from either parser, to
:class:`core.options.MountOptions` field values, so both send the service
the same options. Standard library only.
"""

from __future__ import annotations


class Flag:
    """One flag (a plain class: ``typing`` would cost the fast client an import)."""

    __slots__ = ("name", "kind", "field", "help", "metavar", "dest")

    def __init__(self, name: str, kind: str, field: str | None, help: str,
                 metavar: str | None = None):
        self.name = name  # "--layer"
        self.kind = kind  # text | size | seconds | true | false | append (see fields_from)
        self.field = field  # the MountOptions field it sets; None: the command's own
        self.help = help
        self.metavar = metavar
        self.dest = name[2:].replace("-", "_")  # argparse's attribute name


MOUNT_FLAGS = (
    Flag("--layer", "text", "layer", "mount one raw layer (index or digest)", "N|DIGEST"),
    Flag("--foreground", "true", None, "stay attached; unmount on Ctrl-C / SIGTERM"),
    Flag("--no-prefetch", "false", "prefetch", "skip the prefetch region"),
    Flag("--no-background-fetch", "false", "background_fetch", "fetch only what is read"),
    Flag("--wait-prefetch", "true", "wait_prefetch", "return only after prefetch finished"),
    Flag("--prefetch-size", "size", "prefetch_size",
         "prefetch this many blob bytes when a layer has no landmark", "SIZE"),
    Flag("--allow-other", "true", "allow_other", "let other users see the mount"),
    Flag("--allow-unverified", "true", "allow_unverified",
         "mount layers without a TOC digest annotation (warns)"),
    Flag("--cache-dir", "text", "cache_dir", "chunk cache directory", "DIR"),
    Flag("--cache-size", "size", "cache_size", "chunk cache budget (e.g. 2G; default 4G)", "SIZE"),
    Flag("--platform", "text", "platform", "os/arch of a multi-platform image", "PLATFORM"),
    Flag("--read-timeout", "seconds", "read_timeout",
         "a read waiting longer than this for the registry fails with EIO (logged; default "
         "90); request-timeout in registries.toml bounds each registry request", "SECONDS"),
    Flag("--map-owner", "true", "map_owner",
         "show the image's root (uid/gid 0) as you and its other ids in your /etc/subuid, "
         "/etc/subgid ranges, as rootless podman does"),
    Flag("--uid-map", "append", "uid_map",
         "show image uids C..C+N-1 as H..H+N-1 (fuse-overlayfs syntax; repeatable, before "
         "--map-owner's)", "C:H:N"),
    Flag("--gid-map", "append", "gid_map", "the same for gids", "C:H:N"),
    Flag("--record", "text", "record",
         "write each file opened through the mount to FILE, in order, as JSON lines "
         "(ctr-remote's --estargz-record-in format)", "FILE"),
    Flag("--debug", "true", "debug", "trace FUSE requests in the daemon log"),
    Flag("--force", "true", "force",
         "mount onto a non-empty directory (its contents are hidden meanwhile)"),
)
# --insecure-registry and --timeout come from commands.registry's shared
# registry options: the fast client leaves a command line using them to argparse.
REGISTRY_FIELDS = {"insecure_registry": "insecure_registries"}


def positive_seconds(text: str) -> float:
    """A positive number of seconds; ValueError otherwise."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise ValueError(f"not a positive number of seconds: {text!r}")
    return v


def fields_from(values) -> dict:
    """MountOptions field values from parsed ``values`` (an argparse
    namespace or a dict keyed by :attr:`Flag.dest`): ``false`` flags set
    their field to the opposite, absent values stay out."""
    get = values.get if isinstance(values, dict) else (lambda k: getattr(values, k, None))
    out: dict = {}
    for flag in MOUNT_FLAGS:
        v = get(flag.dest)
        if flag.field is None or v is None:
            continue
        if flag.kind == "false":
            out[flag.field] = not v
        elif flag.kind in ("true", "append"):
            if v:
                out[flag.field] = v
        else:
            out[flag.field] = v
    for dest, field in REGISTRY_FIELDS.items():
        if get(dest):
            out[field] = get(dest)
    return out
