"""The engine in data-flow order: estargz -> layout, registry -> image -> cache -> layer
-> fusefs -> mount -> views (docs/CONTRACTS.md); never imports stargz_tui, textual or rich.
"""

__version__ = "0.1.0"
