"""The demo spine end to end on the tiny simulator preset (< 60 s), and its CLI."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from celltwin import cli
from celltwin.demo import BASELINE_ORDER, DemoConfig, demo_models, pearson_rows, run_demo
from celltwin.errors import ConfigError


def test_pearson_rows_hand_values():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = np.array([[2.0, 4.0, 6.5], [0.0, 1.0, 2.0]])
    r = pearson_rows(a, b)
    assert r[0] == pytest.approx(np.corrcoef(a[0], b[0])[0, 1], rel=1e-12)
    assert np.isnan(r[1])  # a constant row has no correlation
    assert pearson_rows(a[:1], -a[:1])[0] == pytest.approx(-1.0)


def test_demo_tiny_end_to_end(tmp_path):
    t0 = time.perf_counter()
    # the baselines only: the neural models' demo runs are tested by their owners
    res = run_demo(tmp_path / "demo", DemoConfig(preset="tiny", models=BASELINE_ORDER))
    elapsed = time.perf_counter() - t0
    assert elapsed < 60
    t = res.table.set_index("model")
    assert list(t.index[:7]) == ["control", "cell-mean", "perturbation-mean", "context-transfer",
                                 "scaled-context-transfer", "linear", "additive"]
    assert t.index[-1] == "observed"
    # the score is normalised against cell-mean: exactly 0 for cell-mean itself
    assert t.loc["cell-mean", "score"] == 0.0
    for m in t.index[:-1]:
        assert 0.0 <= t.loc[m, "DES"] <= 1.0 and 0.0 < t.loc[m, "PDS"] <= 1.0 and t.loc[m, "MAE"] > 0
        assert t.loc[m, "score"] >= 0.0
    # the control baseline predicts no change: its prediction is uncorrelated with the truth,
    # while transferring the other context's effect recovers a good part of it
    assert abs(t.loc["control", "pearson_true"]) < 0.2
    assert t.loc["context-transfer", "pearson_true"] > 0.4
    assert t.loc["observed", "pearson_true"] > t.loc["cell-mean", "pearson_true"]
    # there are no combinations in the tiny preset: additive falls back on every perturbation
    assert t.loc["additive", "fallbacks"] == 3 and t.loc["context-transfer", "fallbacks"] == 0
    out = tmp_path / "demo"
    for f in ["data.h5ad", "real.h5ad", "split.toml", "summary.csv", "runs/linear/run.json",
              "preds/linear.h5ad", "eval/linear/results.csv", "report/index.md", "report/index.html",
              "report/metrics.png", "report/pred_vs_true.png", "report/pds_per_perturbation.png"]:
        assert (out / f).exists(), f
    summary = pd.read_csv(out / "summary.csv")
    assert summary["model"].tolist() == list(t.index)
    assert "| context-transfer |" in (out / "report" / "index.md").read_text()


def test_demo_cli_subset(tmp_path, capsys):
    rc = cli.main(["demo", "--preset", "tiny", "--models", "control,cell-mean", "--no-report",
                   "-o", str(tmp_path / "d")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cell-mean" in out and "pearson_true" in out
    assert not (tmp_path / "d" / "report").exists()


def test_demo_rejects_unknown_models_and_presets():
    with pytest.raises(ConfigError, match="unknown model"):
        demo_models(["nope"])
    with pytest.raises(ConfigError, match="preset expected one of"):
        DemoConfig(preset="huge")
