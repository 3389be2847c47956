"""CLI subcommand groups: image, registry, mount, optimize, completion, app; each
module exposes ``register(subparsers)``; errors reach the user as one line.
"""
