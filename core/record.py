"""Record files as a workload opens them, in ctr-remote's record format.

A record file is JSON lines, one per regular file, in the order the files
were first opened::

    {"path":"etc/os-release","manifestDigest":"sha256:...","layerIndex":0}

This is stargz-snapshotter's ``recorder.Entry``: ``ctr-remote image convert
--estargz-record-in FILE`` reads ``path`` (its JSON decoder ignores nothing
it knows and everything it does not), and so does ``stargz-tui convert``
and ``stargz-tui optimize --record-in``. ``manifestDigest`` and
``layerIndex`` say which layer served the file: a merged mount records in
every layer daemon, each appending to the same file (``O_APPEND`` writes of
one short line each do not interleave), so the paths are image paths and the
layer tells ``optimize`` which layer to reorder.

:class:`Recorder` is what a daemon holds: ``note(entry_id)`` costs a set
lookup for a file already recorded, one small ``write`` the first time.
:func:`read_record` reads such a file (or a plain list: one path a line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CoreError


@dataclass(frozen=True)
class RecordEntry:
    path: str
    layer: int | None = None
    manifest_digest: str | None = None


class Recorder:
    """Appends one JSON line per entry id the first time it is noted.

    ``path_of(entry_id)`` names the entry (called once per new entry).
    The file is opened for appending and never truncated here: the mount
    manager creates it empty before the daemons start."""

    def __init__(self, path: str, path_of: Callable[[int], str], *,
                 layer: int | None = None, manifest_digest: str | None = None):
        self.path = path
        self._path_of = path_of
        self._extra: dict = {}
        if manifest_digest:
            self._extra["manifestDigest"] = manifest_digest
        if layer is not None:
            self._extra["layerIndex"] = layer
        self._seen: set[int] = set()
        self.count = 0
        self.errors = 0
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)
        except OSError as e:
            raise CoreError(f"cannot open the record file {path}: {e.strerror}") from None

    def note(self, entry_id: int) -> None:
        if entry_id in self._seen:
            return
        self._seen.add(entry_id)
        line = json.dumps({"path": self._path_of(entry_id), **self._extra},
                          separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            # one write of a whole line: O_APPEND keeps other daemons' lines apart
            os.write(self._fd, line.encode("utf-8", "surrogateescape"))
            self.count += 1
        except OSError:
            self.errors += 1  # a full disk loses lines, never the read being served

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse_record(text: str, source: str = "the record") -> list[RecordEntry]:
    """Entries of a record (JSON lines) or of a plain list (one path a line,
    ``#`` comments); the first occurrence of a path wins, as in ctr-remote."""
    out: list[RecordEntry] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                raise CoreError(f"{source} line {n} is not valid JSON") from None
            p = obj.get("path") if isinstance(obj, dict) else None
            if not isinstance(p, str):
                raise CoreError(f"{source} line {n} has no \"path\"")
            layer = obj.get("layerIndex")
            md = obj.get("manifestDigest")
            entry = RecordEntry(p, layer if isinstance(layer, int) else None,
                                md if isinstance(md, str) else None)
        else:
            entry = RecordEntry(line)
        key = entry.path.strip("/")
        if key and key not in seen:
            seen.add(key)
            out.append(RecordEntry(key, entry.layer, entry.manifest_digest))
    return out


def read_record(path: str) -> list[RecordEntry]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise CoreError(f"cannot read the record file {path}: {e.strerror}") from None
    return parse_record(text, path)


def read_paths(path: str) -> list[str]:
    """The paths of :func:`read_record`, in order (for ``--prioritize-file @LIST``)."""
    return [e.path for e in read_record(path)]
