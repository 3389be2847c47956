"""The per-user mount service (:mod:`.server`), its wire protocol
(:mod:`.protocol`) and its client (:mod:`.client`). Import the submodule you
need: the client must stay light (the CLI uses it before it imports the core)."""
