"""Tiny Perturb-seq-like AnnData generated in the tests (no files shipped)."""

from __future__ import annotations

import numpy as np
import pytest

GENES = ["A", "B", "C"] + [f"g{i}" for i in range(3, 20)]


def _skip(pert: str, context: str | None, batch: str | None) -> bool:
    """Context c2 has no cells of C; batch b2 of context c2 has no controls."""
    return context == "c2" and (pert == "C" or (batch == "b2" and pert == "non-targeting"))


@pytest.fixture(name="make_adata")
def _make_adata_fixture(make_screen):
    def make_adata(seed: int = 0, n_per: int = 12, fmt: str = "csr", dtype=np.float32, knock: float = 0.1):
        """2 contexts (obs ``cell_type``) x 2 batches; perturbations A, B, C, A+B and controls; genes A, B, C, g3..g19.

        Counts are Poisson; the target gene of a perturbed cell has its rate multiplied by ``knock``.
        Context c2 has no cells of C; batch b2 of context c2 has no controls. ``obsm["X_state"]``: 4 columns.
        """
        return make_screen(seed, genes=GENES, perts=("A", "B", "C", "A+B"), n_per=n_per, contexts=("c1", "c2"),
                           batches=("b1", "b2"), context_col="cell_type", skip=_skip, effect=knock, fmt=fmt,
                           dtype=dtype, obsm={"X_state": 4})

    return make_adata


@pytest.fixture
def tiny(make_adata):
    return make_adata()
