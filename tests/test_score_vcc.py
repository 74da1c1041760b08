"""`celltwin score` builds the VCC baseline itself: equal to baseline + eval + score done by hand."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_columns_flow import _screen

from celltwin import cli
from celltwin.eval import VCC_BASELINE_NAME

EVAL = ["--no-cache", "--no-report", "--no-progress"]


def _run(args):
    assert cli.main([str(a) for a in args]) == 0


@pytest.fixture
def predicted(tmp_path, make_screen):
    """Split (d1: g1, g3 held out), cell-mean run, prediction and real cells, with the default names."""
    data = tmp_path / "screen.h5ad"
    a = _screen(make_screen, {"pert": "target_gene", "context": "context"}, "non-targeting")
    a.write_h5ad(data)
    _run(["split", data, "--target", "d1", "--test", "g1,g3", "-o", tmp_path / "split.toml"])
    _run(["train", "--model", "cell-mean", "--split", tmp_path / "split.toml", "-o", tmp_path / "run"])
    _run(["predict", tmp_path / "run", "--split", tmp_path / "split.toml", "-o", tmp_path / "pred.h5ad",
          "--write-real", tmp_path / "real.h5ad"])
    # the training cells of the predicted context, as a file (what VCC's adata_Training.h5ad is)
    keep = ((a.obs["context"] == "d1") & ~a.obs["target_gene"].isin(["g1", "g3"])).to_numpy()
    train = a[keep].copy()
    train.obs = train.obs[["target_gene"]]
    train.write_h5ad(tmp_path / "train.h5ad")
    return tmp_path, a


def test_score_equals_baseline_eval_score_by_hand(predicted, capsys):
    d, _ = predicted
    real = ad.read_h5ad(d / "real.h5ad")
    labels = real.obs["target_gene"].astype(str)
    perts = [p for p in pd.unique(labels) if p != "non-targeting"]
    pd.DataFrame({"target_gene": perts, "n_cells": [int((labels == p).sum()) for p in perts]}).to_csv(
        d / "counts.csv", index=False)
    # by hand: cell-eval's recipe with celltwin's commands
    _run(["baseline", "-a", d / "train.h5ad", "-c", d / "counts.csv", "-o", d / "base.h5ad", "--skip-de"])
    _run(["eval", "--pred", d / "base.h5ad", "--real", d / "real.h5ad", "-o", d / "ev_base", *EVAL])
    _run(["eval", "--pred", d / "pred.h5ad", "--real", d / "real.h5ad", "-o", d / "ev_model", *EVAL])
    _run(["score", "-i", d / "ev_model" / "agg_results.csv", "-I", d / "ev_base" / "agg_results.csv",
          "-o", d / "by_hand.csv"])
    capsys.readouterr()
    # one command
    _run(["score", "--pred", d / "pred.h5ad", "--real", d / "real.h5ad", "--train", d / "train.h5ad",
          "-o", d / "one.csv", "--save-baseline", d / "vb.h5ad"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"baseline: {VCC_BASELINE_NAME}, built from 64 training cells of ")
    assert "with the 32 cells of 2 perturbation(s) of real.h5ad" in out
    assert f"metric\tmodel\t{VCC_BASELINE_NAME}\tscore" in out

    hand = pd.read_csv(d / "by_hand.csv")
    one = pd.read_csv(d / "one.csv")
    assert list(one.columns) == ["metric", "model", VCC_BASELINE_NAME, "from_baseline"]
    assert one["metric"].tolist() == hand["metric"].tolist() == ["mae", "overlap_at_N", "discrimination_score_l1",
                                                                  "avg_score"]
    np.testing.assert_array_equal(one["from_baseline"].to_numpy(), hand["from_baseline"].to_numpy())
    m_model = pd.read_csv(d / "ev_model" / "agg_results.csv").set_index("statistic").loc["mean"]
    m_base = pd.read_csv(d / "ev_base" / "agg_results.csv").set_index("statistic").loc["mean"]
    metrics = one["metric"].tolist()[:3]
    np.testing.assert_allclose(one["model"].to_numpy()[:3], m_model[metrics].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(one[VCC_BASELINE_NAME].to_numpy()[:3], m_base[metrics].to_numpy(), rtol=1e-12)
    # the saved baseline is the `celltwin baseline` file
    vb, base = ad.read_h5ad(d / "vb.h5ad"), ad.read_h5ad(d / "base.h5ad")
    np.testing.assert_array_equal(np.asarray(vb.X.todense()), np.asarray(base.X.todense()))
    assert vb.obs["target_gene"].astype(str).tolist() == base.obs["target_gene"].astype(str).tolist()
    # the project's cell-mean model is not the VCC baseline: different MAE
    assert one.loc[0, "model"] != pytest.approx(one.loc[0, VCC_BASELINE_NAME], rel=1e-3)

    # --split: the split's training cells of the test context (same cells) give the same score
    _run(["score", "--pred", d / "pred.h5ad", "--real", d / "real.h5ad", "--split", d / "split.toml",
          "-o", d / "split.csv"])
    assert "64 training cells of" in capsys.readouterr().out
    via_split = pd.read_csv(d / "split.csv")
    np.testing.assert_array_equal(via_split["from_baseline"].to_numpy(), one["from_baseline"].to_numpy())
    # -i with the model's agg table instead of --pred: same score
    _run(["score", "-i", d / "ev_model" / "agg_results.csv", "--real", d / "real.h5ad", "--train",
          d / "train.h5ad", "-o", d / "agg.csv"])
    np.testing.assert_array_equal(pd.read_csv(d / "agg.csv")["from_baseline"].to_numpy(),
                                  one["from_baseline"].to_numpy())


def test_score_with_own_column_names_reads_the_split(tmp_path, capsys, make_screen):
    data = tmp_path / "screen.h5ad"
    _screen(make_screen, {"pert": "gene", "context": "day"}, "control").write_h5ad(data)
    _run(["split", data, "--pert-col", "gene", "--control-pert", "control", "--context-col", "day",
          "--target", "d1", "--test", "g1,g3", "-o", tmp_path / "split.toml"])
    _run(["train", "--model", "cell-mean", "--split", tmp_path / "split.toml", "-o", tmp_path / "run"])
    _run(["predict", tmp_path / "run", "--split", tmp_path / "split.toml", "-o", tmp_path / "pred.h5ad",
          "--write-real", tmp_path / "real.h5ad"])
    capsys.readouterr()
    _run(["score", "--pred", tmp_path / "pred.h5ad", "--real", tmp_path / "real.h5ad", "--split",
          tmp_path / "split.toml", "-o", tmp_path / "s.csv"])
    assert "columns gene / control 'control'" in capsys.readouterr().out
    s = pd.read_csv(tmp_path / "s.csv").set_index("metric")
    assert 0 <= s.loc["avg_score", "from_baseline"] <= 1 and np.isfinite(s.loc["mae", VCC_BASELINE_NAME])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--real", "r.h5ad", "--train", "t.h5ad"], "give the model"),
        (["--pred", "p.h5ad", "--train", "t.h5ad"], "give --real"),
        (["--pred", "p.h5ad", "-i", "a.csv", "--real", "r.h5ad", "--train", "t.h5ad"], "not both"),
        (["-i", "a.csv", "-I", "b.csv", "--train", "t.h5ad"], "give only -i"),
        (["--pred", "p.h5ad", "--real", "r.h5ad", "--train", "t.h5ad", "--split", "s.toml"], "not both"),
    ],
)
def test_score_argument_errors(args, match, capsys):
    assert cli.main(["score", *args]) == 2
    assert match in capsys.readouterr().err


def _stream_guard(monkeypatch, path):
    """Patch the baseline's block size small, refuse whole reads of ``path``, count its block reads."""
    import celltwin.eval._baseline as baseline_mod
    import celltwin.eval._load as load_mod
    from celltwin.data.source import H5adSource

    monkeypatch.setattr(baseline_mod, "BLOCK_ROWS", 7)
    whole = load_mod.read_h5ad

    def refuse(p, *a, **k):
        if str(p) == str(path):
            raise AssertionError(f"{p} read whole")
        return whole(p, *a, **k)

    monkeypatch.setattr(load_mod, "read_h5ad", refuse)
    monkeypatch.setattr(ad, "read_h5ad", refuse)
    reads = []
    stored = H5adSource.read_stored

    def counted(self, uniq):
        if str(self.path) == str(path):
            reads.append(len(uniq))
        return stored(self, uniq)

    monkeypatch.setattr(H5adSource, "read_stored", counted)
    return reads


def _same_anndata(got, want):
    assert got.obs.equals(want.obs) and got.var_names.equals(want.var_names)
    assert type(got.X) is type(want.X) and got.X.dtype == want.X.dtype
    g, w = (got.X.toarray(), want.X.toarray()) if hasattr(got.X, "toarray") else (got.X, want.X)
    assert g.tobytes() == w.tobytes()  # bitwise


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_baseline_streams_the_training_file(tmp_path, make_screen, monkeypatch, fmt):
    """`celltwin baseline -a FILE` reads FILE in row blocks, never whole, with bitwise the in-memory result."""
    from celltwin.eval import cell_mean_baseline

    a = _screen(make_screen, {"pert": "target_gene", "context": "context"}, "non-targeting")
    if fmt == "dense":
        a.X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X)
    path = tmp_path / "train.h5ad"
    a.write_h5ad(path)
    pd.DataFrame({"target_gene": ["g1", "g2"], "n_cells": [3, 5]}).to_csv(tmp_path / "c.csv", index=False)
    want = cell_mean_baseline(ad.read_h5ad(path), tmp_path / "c.csv", source=str(path))  # in memory
    reads = _stream_guard(monkeypatch, path)
    _run(["baseline", "-a", path, "-c", tmp_path / "c.csv", "-o", tmp_path / "b.h5ad", "--skip-de"])
    assert len(reads) >= 2 * 4 and max(reads) <= 7  # two passes of several blocks
    monkeypatch.undo()
    got = ad.read_h5ad(tmp_path / "b.h5ad")
    want.write_h5ad(tmp_path / "want.h5ad")
    _same_anndata(got, ad.read_h5ad(tmp_path / "want.h5ad"))


def test_score_streams_the_training_file_of_a_context(predicted, monkeypatch, capsys):
    """`celltwin score --train FILE --context C`: FILE's cells of C streamed in row blocks, never read
    whole; the baseline is bitwise the one built from the in-memory AnnData of those cells."""
    from celltwin.eval._baseline import vcc_baseline

    d, a = predicted
    path = d / "train_all.h5ad"
    a.write_h5ad(path)  # every context, controls included
    keep = (a.obs["context"] == "d1").to_numpy()
    want, _ = vcc_baseline(ad.read_h5ad(path)[keep].copy(), d / "real.h5ad")  # in memory
    reads = _stream_guard(monkeypatch, path)
    capsys.readouterr()
    _run(["score", "--pred", d / "pred.h5ad", "--real", d / "real.h5ad", "--train", path, "--context", "d1",
          "-o", d / "s.csv", "--save-baseline", d / "vb.h5ad"])
    assert f"built from {int(keep.sum())} training cells of" in capsys.readouterr().out
    assert len(reads) >= 2 * 4 and max(reads) <= 7
    monkeypatch.undo()
    want.write_h5ad(d / "want.h5ad")
    _same_anndata(ad.read_h5ad(d / "vb.h5ad"), ad.read_h5ad(d / "want.h5ad"))
