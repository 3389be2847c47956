"""stargz-tui's embedded engine: formats, registry client, lazy FUSE core.

This package stands alone: it never imports ``stargz_tui`` or ``textual``.
"""

__version__ = "0.1.0"
