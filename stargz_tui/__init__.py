"""stargz-tui: terminal inspector and mount manager for lazily pulled images."""

__version__ = "0.1.0"
