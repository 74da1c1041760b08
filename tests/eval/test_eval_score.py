"""celltwin.eval.score against cell-eval 0.8.2 score_agg_metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celltwin.eval import score


def _agg(vals: dict[str, float]) -> pd.DataFrame:
    stats = ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    df = pd.DataFrame({"statistic": stats})
    for k, v in vals.items():
        df[k] = [10.0, 0.0, v, 0.1, 0.0, 0.0, v, 0.0, 1.0]
    return df


def test_score_hand():
    user = _agg({"overlap_at_N": 0.4, "mae": 0.1, "discrimination_score_l1": 0.2})
    base = _agg({"overlap_at_N": 0.2, "mae": 0.2, "discrimination_score_l1": 0.5})
    got = score(user, base)
    assert got["metric"].tolist() == ["mae", "overlap_at_N", "discrimination_score_l1", "avg_score"]
    # mae: 1 - 0.1/0.2 = 0.5; DES: (0.4-0.2)/0.8 = 0.25; PDS: (0.2-0.5)/0.5 < 0 -> 0
    np.testing.assert_allclose(got["from_baseline"], [0.5, 0.25, 0.0, 0.25])


@pytest.mark.reference
def test_score_matches_cell_eval(tmp_path):
    ce = pytest.importorskip("cell_eval")
    pl = pytest.importorskip("polars")
    user = _agg(
        {
            "overlap_at_N": 0.31,
            "mae": 0.12,
            "discrimination_score_l1": 0.7,
            "pearson_delta": 0.9,
            "de_nsig_counts_real": 5.0,
            "precision_at_N": float("nan"),
        }
    )
    base = _agg(
        {
            "overlap_at_N": 0.2,
            "mae": 0.0,
            "discrimination_score_l1": 0.5,
            "pearson_delta": 1.0,
            "de_nsig_counts_real": 3.0,
            "precision_at_N": 0.1,
        }
    )
    ref = ce.score_agg_metrics(pl.from_pandas(user), pl.from_pandas(base)).to_pandas()
    got = score(user, base)
    assert got["metric"].tolist() == ref["metric"].tolist()
    np.testing.assert_allclose(got["from_baseline"], ref["from_baseline"], rtol=0, atol=1e-15)


def test_score_mismatched_columns():
    from celltwin.errors import InputError

    with pytest.raises(InputError, match="columns differ"):
        score(_agg({"mae": 0.1}), _agg({"overlap_at_N": 0.1}))
