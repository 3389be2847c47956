"""Shared pytest fixtures.

Each area keeps its fixtures in its own module and re-exports them here, so
every test directory sees them. Registry, token issuer, redirecting front and
keyring fixtures: see ``tests/registry_fixtures.py`` (API in its docstring).
"""

import os

# `stargz-tui mount` starts the mount service (core.service) by default;
# tests get one only where they ask for it (tests/test_service.py).
os.environ["STARGZ_TUI_SERVER"] = "off"

# --- registry fixtures -----------------------------------------------------------------
from registry_fixtures import (  # noqa: F401
    basic_registry,
    front_proxy,
    isolated_env,
    keyring_env,
    make_registry,
    make_token_registry,
    redirecting_front,
    registry,
    secret_service,
    token_registry,
)

# --- other areas: add your fixture imports below ---------------------------------------
