"""A screen with its own column names: split records them, train / predict read them, predict keeps them."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celltwin import cli
from celltwin.data.split import read_split

GENES = [f"g{i}" for i in range(12)]
PERTS = ["g0", "g1", "g2", "g3", "g4"]


def _screen(make_screen, names: dict[str, str], control: str, seed: int = 0) -> ad.AnnData:
    """Counts; 2 days x (control + 5 knockdowns of measured genes), 16 cells each."""
    a = make_screen(seed, genes=GENES, perts=PERTS, n_per=16, contexts=("d1", "d2"), control=control,
                    pert_col=names["pert"], context_col=names["context"], base=(3.0, 2.0, 1.0),
                    size_factor=(0.7, 1.3), effect={"d1": 0.1, "d2": 0.3})
    a.obs["lane"] = "L1"
    return a


def _means(outdir) -> dict[str, float]:
    agg = pd.read_csv(outdir / "agg_results.csv").set_index("statistic")
    return agg.loc["mean"].to_dict()


@pytest.fixture
def screens(tmp_path, make_screen):
    own = tmp_path / "own" / "screen.h5ad"
    canon = tmp_path / "canon" / "screen.h5ad"
    own.parent.mkdir()
    canon.parent.mkdir()
    _screen(make_screen, {"pert": "gene", "context": "day"}, "control").write_h5ad(own)
    _screen(make_screen, {"pert": "target_gene", "context": "context"}, "non-targeting").write_h5ad(canon)
    return own, canon


def test_train_and_predict_read_the_split_columns(screens, capsys):
    own, canon = screens
    d = own.parent
    assert cli.main(["split", str(own), "--pert-col", "gene", "--control-pert", "control", "--context-col",
                     "day", "--target", "d1", "--test", "g1,g3", "-o", str(d / "split.toml")]) == 0
    assert read_split(d / "split.toml").columns == {"pert_col": "gene", "control_label": "control",
                                                    "context_col": "day"}
    # no column flag from here on: train and predict take the names from the split
    assert cli.main(["train", "--model", "cell-mean", "--split", str(d / "split.toml"), "-o", str(d / "run")]) == 0
    meta = json.loads((d / "run" / "run.json").read_text())
    assert meta["columns"] == {"pert_col": "gene", "control_label": "control", "context_col": "day",
                               "batch_col": None}
    assert meta["n_train_cells"] == 16 * 6 + 16 * 4  # all of d2 + d1's controls, g0, g2, g4
    assert cli.main(["predict", str(d / "run"), "--split", str(d / "split.toml"), "-o", str(d / "pred.h5ad"),
                     "--write-real", str(d / "real.h5ad")]) == 0
    pred, real = ad.read_h5ad(d / "pred.h5ad"), ad.read_h5ad(d / "real.h5ad")
    for a in (pred, real):  # the data's own names and control label
        assert list(a.obs.columns) == ["gene", "day"]
        assert a.obs["gene"].value_counts().sort_index().to_dict() == {"control": 16, "g1": 16, "g3": 16}
        assert set(a.obs["day"]) == {"d1"}
    info = pred.uns["celltwin_predict"]
    assert (info["pert_col"], info["control_label"], info["context_col"]) == ("gene", "control", "day")
    capsys.readouterr()
    assert cli.main(["eval", "--pred", str(d / "pred.h5ad"), "--real", str(d / "real.h5ad"), "--pert-col", "gene",
                     "--control", "control", "--no-cache", "--no-report", "--no-progress", "-o", str(d / "ev")]) == 0

    # the same screen with the default names, run with default flags everywhere: the same numbers
    c = canon.parent
    assert cli.main(["split", str(canon), "--target", "d1", "--test", "g1,g3", "-o", str(c / "split.toml")]) == 0
    assert cli.main(["train", "--model", "cell-mean", "--split", str(c / "split.toml"), "-o", str(c / "run")]) == 0
    assert cli.main(["predict", str(c / "run"), "--split", str(c / "split.toml"), "-o", str(c / "pred.h5ad"),
                     "--write-real", str(c / "real.h5ad")]) == 0
    cpred = ad.read_h5ad(c / "pred.h5ad")
    assert list(cpred.obs.columns) == ["target_gene", "context"]
    np.testing.assert_array_equal(cpred.X.toarray(), pred.X.toarray())
    assert cli.main(["eval", "--pred", str(c / "pred.h5ad"), "--real", str(c / "real.h5ad"), "--no-cache",
                     "--no-report", "--no-progress", "-o", str(c / "ev")]) == 0
    own_m, canon_m = _means(d / "ev"), _means(c / "ev")
    assert own_m == canon_m and 0 < own_m["mae"] < 1


def test_flags_win_over_the_split_and_old_splits_still_work(screens, capsys):
    own, _ = screens
    d = own.parent
    assert cli.main(["split", str(own), "--pert-col", "gene", "--control-pert", "control", "--context-col",
                     "day", "--target", "d1", "--test", "g1", "-o", str(d / "split.toml")]) == 0
    capsys.readouterr()
    # an explicit flag wins over the split's [columns] (here: a wrong one, so training fails naming it)
    rc = cli.main(["train", "--model", "cell-mean", "--split", str(d / "split.toml"), "-o", str(d / "bad"),
                   "--pert-col", "target_gene"])
    assert rc == 2 and "'target_gene' not found" in capsys.readouterr().err
    # a split without the table (older celltwin, cell-load / STATE): the flags say it, as before
    text = (d / "split.toml").read_text()
    start = text.index("[columns]")
    (d / "old.toml").write_text(text[:start] + text[text.index("[training]"):])
    assert read_split(d / "old.toml").columns == {}
    rc = cli.main(["train", "--model", "cell-mean", "--split", str(d / "old.toml"), "-o", str(d / "r0")])
    assert rc == 2 and "'target_gene' not found" in capsys.readouterr().err  # the defaults
    assert cli.main(["train", "--model", "cell-mean", "--split", str(d / "old.toml"), "-o", str(d / "r1"),
                     "--pert-col", "gene", "--control-label", "control", "--context-col", "day"]) == 0
    assert cli.main(["train", "--model", "cell-mean", "--split", str(d / "split.toml"), "-o", str(d / "r2")]) == 0
    a = np.load(d / "r1" / "baseline.npz")
    b = np.load(d / "r2" / "baseline.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    # predict with the old split: the run's columns (run.json) fill in
    assert cli.main(["predict", str(d / "r1"), "--split", str(d / "old.toml"), "-o", str(d / "p.h5ad")]) == 0
    assert ad.read_h5ad(d / "p.h5ad").obs["gene"].value_counts().to_dict() == {"control": 16, "g1": 16}
