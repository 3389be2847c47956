"""A mount's options as plain data, normalized the one way every caller needs.

Contract: :func:`mount_fields` turns what a user asked for (an image, a
mountpoint, a layer and :class:`core.options.MountOptions` field values)
into the dict of fields ``MountOptions`` is made of: paths absolute against
the caller's working directory (``~`` expanded), an ``oci:DIR`` layout's
DIR too, list fields as tuples of strings, None values left out (the
struct's default applies). :meth:`core.options.MountOptions.build` builds
the struct from it; the ``stargz-tui mount`` fast client
(:mod:`stargz_tui.mountclient`) sends it to the mount service as JSON,
where it is validated into the same struct. Standard library only (the
fast client imports this before it knows whether the service answers).
"""

from __future__ import annotations

import os

DEFAULT_READY_TIMEOUT = 120.0  # seconds a mount may take to be served
LIST_FIELDS = ("insecure_registries", "uid_map", "gid_map")
PATH_FIELDS = ("cache_dir", "record")


def mount_fields(image: str, mountpoint: str, *, layer=None, cwd: str | None = None,
                 **fields) -> dict:
    """The normalized fields (module docs); ``tuning`` is left to the caller."""
    base = cwd or os.getcwd()

    def absolute(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    out = {k: v for k, v in fields.items() if v is not None}  # None: the default
    for key in LIST_FIELDS:
        if key in out:
            out[key] = tuple(str(x) for x in out[key] or ())
    for key in PATH_FIELDS:
        if key in out:
            out[key] = absolute(str(out[key]))
    out["image"] = absolute_image(image, base)
    out["mountpoint"] = absolute(mountpoint)
    if layer is not None:
        out["layer"] = str(layer)
    return out


def absolute_image(image: str, cwd: str) -> str:
    """``oci:DIR[:TAG]`` with DIR absolute (daemons run in /); others as given."""
    if not image.startswith("oci:"):
        return image
    from .reference import parse_reference

    ref = parse_reference(image)
    rest = image[4 + len(ref.layout_dir):]
    return "oci:" + os.path.normpath(os.path.join(cwd, ref.layout_dir)) + rest
