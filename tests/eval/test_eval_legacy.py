"""Legacy mode (2025 leaderboard: cell-eval 0.6.6 + pdex 0.1.27) against golden files in tests/data/legacy."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ad = pytest.importorskip("anndata")

from celltwin.eval import EvalConfig, evaluate

DATA = Path(__file__).resolve().parents[1] / "data" / "legacy"
CASES = sorted(p.name.removesuffix("_inputs.npz") for p in DATA.glob("*_inputs.npz"))


def _csv(path: Path) -> pd.DataFrame:
    with gzip.open(path, "rt") as fh:
        return pd.read_csv(fh)


def _adata(X, labels, genes):
    a = ad.AnnData(X.copy())
    a.obs["target_gene"] = pd.Categorical(labels)
    a.obs_names = [f"c{i}" for i in range(len(labels))]
    a.var_names = list(genes)
    return a


@pytest.mark.skipif(not CASES, reason="no legacy golden files")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("de_source", ["computed", "golden"])
def test_legacy_vcc_matches_golden(case, de_source):
    z = np.load(DATA / f"{case}_inputs.npz")
    labels, genes, control = z["labels"], z["genes"], str(z["control"])
    real, pred = _adata(z["X_real"], labels, genes), _adata(z["X_pred"], labels, genes)
    kw = {}
    if de_source == "golden":  # isolates the metric rules from the DE engine
        kw = dict(
            de_real=_csv(DATA / f"{case}_de_real.csv.gz"), de_pred=_csv(DATA / f"{case}_de_pred.csv.gz")
        )
    ours = evaluate(pred, real, config=EvalConfig(mode="legacy", control=control), **kw)
    ref, ref_agg = _csv(DATA / f"{case}_results.csv.gz"), _csv(DATA / f"{case}_agg_results.csv.gz")
    assert list(ours.results.columns) == list(ref.columns)
    assert ours.results["perturbation"].tolist() == ref["perturbation"].astype(str).tolist()
    for c in ref.columns[1:]:
        np.testing.assert_allclose(
            ours.results[c].to_numpy(float), ref[c].to_numpy(float), rtol=0, atol=1e-12, err_msg=c
        )
    for c in ref_agg.columns[1:]:
        np.testing.assert_allclose(
            ours.agg[c].to_numpy(float), ref_agg[c].to_numpy(float), rtol=1e-12, atol=1e-12
        )


def test_legacy_log2_rule():
    from celltwin.eval._de_columns import legacy_log2_fold_change

    fc = np.array([1.0, 2.0, 0.05, 20.0, np.nan, 0.5], dtype=np.float32)
    got = legacy_log2_fold_change(fc)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [0.0, 1.0, np.log2(0.05), np.log2(20.0), 0.0, -1.0], rtol=1e-6)


LEGACY_PY = Path(__file__).resolve().parents[2] / ".venv-legacy" / "bin" / "python"
_LEGACY_SCRIPT = """
import sys, logging, warnings
import numpy as np
warnings.simplefilter("ignore"); logging.disable(logging.CRITICAL)
sys.path.insert(0, sys.argv[1])
from make_legacy_golden import make_case, _adata
from cell_eval import MetricsEvaluator
Xr, Xp, lab, genes = make_case(5, 80, [20, 20, 15, 30, 12], 50, "float32")
np.savez(sys.argv[2] + "/in.npz", Xr=Xr, Xp=Xp, lab=lab.astype(str), genes=genes.astype(str))
ev = MetricsEvaluator(adata_pred=_adata(Xp, lab, genes), adata_real=_adata(Xr, lab, genes),
                      control_pert="non-targeting", pert_col="target_gene", num_threads=1, outdir=sys.argv[2])
res, agg = ev.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False)
res.write_csv(sys.argv[2] + "/res.csv")
"""


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.skipif(
    not LEGACY_PY.exists(), reason="needs the legacy reference venv .venv-legacy (cell-eval 0.6.6)"
)
def test_legacy_full_profile_against_cell_eval_066(tmp_path):
    """Full profile in legacy mode against cell-eval 0.6.6 itself, run in its own venv."""
    import subprocess

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    subprocess.run(
        [str(LEGACY_PY), "-c", _LEGACY_SCRIPT, str(scripts), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    z = np.load(tmp_path / "in.npz")
    ours = evaluate(
        _adata(z["Xp"], z["lab"], z["genes"]),
        _adata(z["Xr"], z["lab"], z["genes"]),
        config=EvalConfig(mode="legacy", profile="full"),
    )
    ref = pd.read_csv(tmp_path / "res.csv")
    ours.results = ours.results.drop(columns=["clustering_agreement"])  # skipped on the reference side
    assert list(ours.results.columns) == list(ref.columns)
    for c in ref.columns[1:]:
        np.testing.assert_allclose(
            ours.results[c].to_numpy(float),
            ref[c].to_numpy(float),
            rtol=0,
            atol=1e-12,
            equal_nan=True,
            err_msg=c,
        )
