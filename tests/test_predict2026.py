"""``celltwin predict`` writing the Virtual Cell Challenge 2026 upload's shape.

Integer counts at a target median depth (``--sample-counts poisson --target-depth D``), exactly N
cells per perturbation (``--cells-per-pert``), no control rows (``--no-controls``), several contexts
in one file (``--context A,B,C`` / ``--all-contexts``), and ``--format vcc2026`` for all of them:
the file passes ``celltwin prep --format vcc2026``'s checks.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celltwin import cli
from celltwin.errors import ConfigError, InputError
from celltwin.eval._prep2026 import prep_vcc2026
from celltwin.predict_files import predict_from_files

PERTS = ("g1", "g2", "g3")  # perturbations named after genes of the screen
CTXS = ("A", "B", "C")


@pytest.fixture(scope="module")
def screen(tmp_path_factory, make_screen):
    """``(folder, AnnData)``: a 3-context counts screen, a cell-mean run trained on it, the bundle files."""
    from celltwin.predict import train_run

    d = tmp_path_factory.mktemp("screen")
    a = make_screen(0, n_genes=40, perts=PERTS, contexts=CTXS, n_per=10, n_ctrl=30)
    a.write_h5ad(d / "data.h5ad")
    train_run("cell-mean", a, d / "run")
    pd.DataFrame({"gene_name": list(a.var_names)}).to_csv(d / "gene_names.csv", index=False)
    # the 2026 pert_counts.csv: a bare list of perturbations (no n_cells), with the control row
    pd.DataFrame({"target_gene": [*PERTS, "non-targeting"]}).to_csv(d / "pert_counts.csv", index=False)
    return d, a


def _predict(d, out, *flags) -> ad.AnnData:
    rc = cli.main(["predict", str(d / "run"), "--data", str(d / "data.h5ad"), "--counts", str(d / "pert_counts.csv"),
                   "-o", str(out), *flags])
    assert rc == 0
    return ad.read_h5ad(out)


def _totals(p: ad.AnnData) -> np.ndarray:
    return np.asarray(p.X.sum(axis=1)).ravel()


def test_format_vcc2026_passes_prep(screen, tmp_path, capsys):
    d, a = screen
    p = _predict(d, tmp_path / "pred.h5ad", "--format", "vcc2026")
    assert "3 perturbations, no controls) in 3 contexts (A, B, C)" in capsys.readouterr().out
    assert list(p.obs.columns) == ["target_gene", "context"]
    assert list(p.var_names) == list(a.var_names)
    assert "non-targeting" not in set(p.obs["target_gene"].astype(str))  # no controls
    sizes = p.obs.groupby(["context", "target_gene"], observed=True).size()
    assert sizes.to_dict() == {(c, g): 400 for c in CTXS for g in PERTS}  # exactly 400 per perturbation and context
    X = p.X.toarray()
    assert np.array_equal(X, np.round(X)) and (X >= 0).all()  # integer counts
    t = _totals(p)
    for c in CTXS:  # median depth 20000 in every context
        assert np.median(t[(p.obs["context"] == c).to_numpy()]) == pytest.approx(20_000, rel=0.05)
    info = p.uns["celltwin_predict"]
    assert info["counts"]["dist"] == "poisson" and info["counts"]["target_depth"] == 20_000
    assert not info["controls_written"]
    assert list(info["contexts"]) == list(CTXS)

    # the file passes the 2026 upload checks (vcc prep's), through the library and the command
    res = prep_vcc2026(tmp_path / "pred.h5ad", d / "gene_names.csv", tmp_path / "pred.vcc",
                       perts=d / "pert_counts.csv", contexts="A,B,C")
    assert res.cells_per_context == dict.fromkeys(CTXS, 1200) and res.verified_targets
    assert cli.main(["prep", "--format", "vcc2026", "-i", str(tmp_path / "pred.h5ad"), "-g",
                     str(d / "gene_names.csv"), "--perts", str(d / "pert_counts.csv"), "--contexts", "A,B,C",
                     "-o", str(tmp_path / "cli.vcc")]) == 0
    assert (tmp_path / "cli.vcc").read_bytes() == (tmp_path / "pred.vcc").read_bytes()


def test_flags_one_by_one(screen, tmp_path):
    d, _ = screen
    p = _predict(d, tmp_path / "p.h5ad", "--sample-counts", "poisson", "--target-depth", "5000",
                 "--cells-per-pert", "100", "--no-controls", "--context", "C,A")
    # contexts in the order given, each with exactly 100 cells of each perturbation, no controls
    assert list(dict.fromkeys(p.obs["context"].astype(str))) == ["C", "A"]
    sizes = p.obs.groupby(["context", "target_gene"], observed=True).size()
    assert sizes.to_dict() == {(c, g): 100 for c in ("A", "C") for g in PERTS}
    t = _totals(p)
    for c in ("A", "C"):
        assert np.median(t[(p.obs["context"] == c).to_numpy()]) == pytest.approx(5000, rel=0.1)
    prep_vcc2026(tmp_path / "p.h5ad", d / "gene_names.csv", None, perts=d / "pert_counts.csv", contexts="A,C",
                 cells_per_pert=100, dry_run=True)
    # without --target-depth the depth is the controls' own (about the screen's library sizes)
    q = _predict(d, tmp_path / "q.h5ad", "--sample-counts", "poisson", "--cells-per-pert", "100", "--no-controls",
                 "--context", "A,C")
    assert np.median(_totals(q)) < 1000


def test_each_context_is_its_one_context_run(screen, tmp_path):
    """A several-context file holds, for each context, what a run of that context alone writes
    (its own controls, the same seed); controls (when written) are each context's real counts."""
    d, a = screen
    flags = ["--sample-counts", "poisson", "--target-depth", "3000", "--cells-per-pert", "30", "--seed", "3"]
    multi = _predict(d, tmp_path / "m.h5ad", *flags, "--context", "A,B")
    for c in ("A", "B"):
        one = _predict(d, tmp_path / f"{c}.h5ad", *flags, "--context", c)
        rows = (multi.obs["context"] == c).to_numpy()
        np.testing.assert_array_equal(multi.X[rows].toarray(), one.X.toarray())
        assert list(multi.obs["target_gene"][rows].astype(str)) == list(one.obs["target_gene"].astype(str))
        # the control rows: that context's real control cells (raw counts)
        ctl = rows & (multi.obs["target_gene"] == "non-targeting").to_numpy()
        real = ((a.obs["context"] == c) & (a.obs["target_gene"] == "non-targeting")).to_numpy()
        np.testing.assert_array_equal(multi.X[ctl].toarray(), a.X[real].toarray())


def test_all_contexts_model_space(screen, tmp_path):
    """--all-contexts without count sampling: log1p predictions plus each context's controls."""
    d, a = screen
    p = _predict(d, tmp_path / "p.h5ad", "--all-contexts", "--cells-per-pert", "5")
    for c in CTXS:
        in_c = p.obs[(p.obs["context"] == c).to_numpy()]
        n_ctl = int(((a.obs["context"] == c) & (a.obs["target_gene"] == "non-targeting")).sum())
        assert in_c["target_gene"].astype(str).value_counts().to_dict() == {**dict.fromkeys(PERTS, 5),
                                                                            "non-targeting": n_ctl}
    X = p.X.toarray()
    assert not np.array_equal(X, np.round(X))  # model space (log1p), not counts


def test_per_context_perturbation_list(screen, tmp_path):
    """A pert_counts.csv with a context column gives each context its own list."""
    d, _ = screen
    pc = tmp_path / "pc.csv"
    pd.DataFrame({"target_gene": ["g1", "g2", "g3", "non-targeting"], "context": ["A", "A", "B", "B"]}).to_csv(
        pc, index=False)
    out = tmp_path / "p.h5ad"
    predict_from_files(d / "run", d / "data.h5ad", out, counts=pc, context=["A", "B"], cells_per_pert=4,
                       no_controls=True)
    p = ad.read_h5ad(out)
    assert p.obs.groupby(["context", "target_gene"], observed=True).size().to_dict() == \
        {("A", "g1"): 4, ("A", "g2"): 4, ("B", "g3"): 4}
    with pytest.raises(InputError, match=r"pc\.csv: no rows for context 'C'"):
        predict_from_files(d / "run", d / "data.h5ad", tmp_path / "x.h5ad", counts=pc, all_contexts=True,
                           cells_per_pert=4)
    assert not (tmp_path / "x.h5ad").exists()


def test_errors(screen, tmp_path, capsys):
    d, _ = screen
    run, data, pc = d / "run", d / "data.h5ad", d / "pert_counts.csv"
    out = tmp_path / "p.h5ad"
    with pytest.raises(ConfigError, match="--target-depth needs --sample-counts"):
        predict_from_files(run, data, out, counts=pc, context="A", cells_per_pert=3, target_depth=100.0)
    with pytest.raises(ConfigError, match="--cells-per-pert must be >= 1"):
        predict_from_files(run, data, out, counts=pc, context="A", cells_per_pert=0)
    with pytest.raises(ConfigError, match="--context or --all-contexts, not both"):
        predict_from_files(run, data, out, counts=pc, context="A", all_contexts=True, cells_per_pert=3)
    with pytest.raises(InputError, match=r"context\(s\) 'Z' not found"):
        predict_from_files(run, data, out, counts=pc, context=["A", "Z"], cells_per_pert=3)
    with pytest.raises(ConfigError, match="--controls holds one context"):
        predict_from_files(run, data, out, counts=pc, context=["A", "B"], cells_per_pert=3, controls=data)
    # the bare 2026 list has no n_cells: without --cells-per-pert it is refused as before (one line, exit 2)
    assert cli.main(["predict", str(run), "--data", str(data), "--counts", str(pc), "--context", "A",
                     "-o", str(out)]) == 2
    assert "column 'n_cells' not found" in capsys.readouterr().err
    assert not out.exists()
