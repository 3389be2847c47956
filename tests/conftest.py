"""Shared pytest fixtures.

Each area keeps its fixtures in its own module and re-exports them here, so
every test directory sees them. Registry, token issuer, redirecting front and
keyring fixtures: see ``tests/registry_fixtures.py`` (API in its docstring).
"""

# --- registry fixtures (issue 3) -------------------------------------------------------
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
