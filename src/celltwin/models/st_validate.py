"""Validation during ST training (``val_pairs``): :func:`make_val_fn` scores held-out groups with celltwin.eval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.models.st_options import StateOptions
from celltwin.models.st_predict import _Predictor
from celltwin.models.st_se_bridge import SEBridge
from celltwin.models.state_transition import StateTransition

__all__ = ["VAL_MAX_CONTROLS", "make_val_fn"]

#: control cells per context read for validation (a random subset when a context has more)
VAL_MAX_CONTROLS = 2048


def make_val_fn(data: Any, pre: Any, labels: Any, val_groups: list[tuple[str, str]], opts: StateOptions,
                 model: StateTransition, bridge: SEBridge | None = None, embed_key: str | None = None):
    """Validation: predict the held-out groups from their context's controls, score with celltwin.eval.

    Cells are read from disk at each validation: the held-out groups' real cells and up to
    :data:`VAL_MAX_CONTROLS` control cells per context (a fixed random subset, seed 0), so memory
    stays bounded on large screens.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from celltwin.eval import EvalConfig, evaluate

    by_ctx: dict[str, list[str]] = {}
    for c, p in val_groups:
        by_ctx.setdefault(c, []).append(p)
    ctrl_rows = labels.control_rows()
    pick = np.random.default_rng(0)
    ctrl_rows = {c: (np.sort(pick.choice(r, VAL_MAX_CONTROLS, replace=False)) if r.size > VAL_MAX_CONTROLS else r)
                 for c, r in ctrl_rows.items()}

    def val(m: torch.nn.Module, step: int) -> dict[str, float]:
        pred = _Predictor(m, opts.zero_below, bridge)
        if pred.output_space == "embedding":  # no gene output to score
            return {}
        rng = np.random.default_rng(0)
        sums: dict[str, list[float]] = {}
        for c, ps in sorted(by_ctx.items()):
            C = data.read_model(ctrl_rows[c], pre)  # (m, G)
            E = data.read_rows(ctrl_rows[c], obsm_key=embed_key) if embed_key else None
            E = E.toarray() if E is not None and sp.issparse(E) else E
            blocks, lab, real_rows = [], [], []
            for p in ps:
                rows = labels.rows[(labels.context == c) & (labels.pert == p)]
                real_rows.append(rows)
                idx = rng.choice(C.shape[0], size=rows.size, replace=rows.size > C.shape[0])
                kw = {"inputs": E[idx]} if E is not None else {}
                blocks.append(pred.predict(C[idx], p, c, rng, **kw))
                lab += [p] * rows.size
            n_ctrl = C.shape[0]
            plab = lab + [CONTROL_LABEL] * n_ctrl
            pa = ad.AnnData(sp.csr_matrix(np.vstack(blocks + [C])),
                            obs=pd.DataFrame({PERT_COL: plab}, index=[f"p{i}" for i in range(len(plab))]))
            rr = np.concatenate(real_rows)
            rlab = [str(x) for x in labels.pert[np.searchsorted(labels.rows, rr)]] + [CONTROL_LABEL] * n_ctrl
            ra = ad.AnnData(sp.vstack([data.read_model(rr, pre, dense=False), sp.csr_matrix(C)], format="csr"),
                            obs=pd.DataFrame({PERT_COL: rlab}, index=[f"r{i}" for i in range(len(rlab))]))
            res = evaluate(pa, ra, config=EvalConfig(progress=False))
            mean = res.agg.set_index("statistic").loc["mean"]
            for k in ("overlap_at_N", "discrimination_score_l1", "mae"):
                if k in mean:
                    sums.setdefault(k, []).append(float(mean[k]))
        return {k: float(np.mean(v)) for k, v in sums.items()}

    return val
