"""The ``stargz-tui`` console entry (and ``python -m stargz_tui``).

It runs :func:`stargz_tui.cli.main`, except for a ``mount`` command line
that :mod:`stargz_tui.mountclient` can send to a running mount service
without argparse or msgspec (it hands anything else back). ``mount``, ``unmount``, ``mounts``
and ``service`` are clients of the mount service (:mod:`core.service`,
through its typed client) and do the same work in-process when it is not
running and cannot be started. A command line imports only its command's
module (``cli.COMMAND_OWNERS``), which keeps a mount through the service
fast without any private interpreter module.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["mount"]:
        # through a running service, without argparse or msgspec (B1); None:
        # the full command line does it
        from .mountclient import run

        code = run(argv[1:])
        if code is not None:
            return _exit_now(code)
    from .cli import main as cli_main

    return cli_main(argv)


def _exit_now(code: int) -> int:
    """End the process with ``code`` once its output is out, without the
    interpreter's teardown (module dicts, a last collection: ~6 ms of a
    ~0.2 s mount, B1). The fast path ran only the standard library's json
    and socket and its own modules: no atexit handler, nothing to close.
    If the output cannot be flushed, Python's own exit reports it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return code
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
