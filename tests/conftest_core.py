"""Shared fixtures for the core_cy tests (imported by tests/test_core_*.py).

``impl`` runs a test once per implementation: the pure-Python twin always, the
compiled module when it is built (skipped otherwise), like multidict's conftest.
"""

from __future__ import annotations

import pytest

import core_cy

IMPLS = core_cy.implementations()


def _params():
    return [
        pytest.param("python", id="python"),
        pytest.param(
            "cython",
            id="cython",
            marks=pytest.mark.skipif("cython" not in IMPLS, reason="compiled core_cy not built"),
        ),
    ]


@pytest.fixture(params=_params())
def impl(request):
    """One implementation bundle (attributes: HashRing, xxh64, *_merge, ...)."""
    return IMPLS[request.param]


@pytest.fixture
def both():
    """(python, cython) bundles, for agreement tests; skipped when not compiled."""
    if "cython" not in IMPLS:
        pytest.skip("compiled core_cy not built")
    return IMPLS["python"], IMPLS["cython"]
