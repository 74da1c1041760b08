"""The VCC 2026 scale (celltwin.eval.v2026): baseline b, replicate r, scaled s, bundle, CLI.

The ``reference`` tests run cell-eval2 0.20.0 ``--preset vcc2026`` (its baseline builder, its
real-bundle producer with the replicate anchor, its scorer) on the same small randomised
reference: 2 contexts x 20 perturbations x 150 genes, tiny groups (4, 5, 7 cells) and other odd
sizes, a shuffled cell order, a categorical label column whose category order is not sorted,
Poisson counts (ties in every DE test), and a submission with an all-tied PDS row (a perturbation
predicted as the control cells) and two identical predictions. u, b, r, every split value, s and
the context scores must agree within 1e-9.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ad = pytest.importorskip("anndata")

from celltwin.cli import main
from celltwin.eval.v2026 import _baseline as BL
from celltwin.eval.v2026 import _config as C
from celltwin.eval.v2026 import _replicate as R
from celltwin.eval.v2026 import _scale as S

CTRL = "non-targeting"
GENES = [f"G{i:03d}" for i in range(150)]
PERTS = GENES[:20]
CONTEXTS = ("A", "B")
TOL = 1e-9


# ---------------------------------------------------------------------------------------------- data
def _reference(make_screen) -> ad.AnnData:
    a = make_screen(
        3,
        genes=GENES,
        perts=PERTS,
        contexts=CONTEXTS,
        n_per=(12, 36),
        n_ctrl=81,
        effect="random",
        size_factor=None,
        n_hits=25,
        hit_factors=(0.5, 2.0),
        base=(1.0, 3.0, 1.0),
        shuffle=True,
        categorical=True,
    )
    obs = a.obs
    keep = np.ones(a.n_obs, dtype=bool)
    for ctx, pert, n in (("A", "G001", 4), ("A", "G002", 5), ("B", "G003", 4), ("B", "G004", 7)):
        rows = np.flatnonzero((obs["context"] == ctx).to_numpy() & (obs["target_gene"] == pert).to_numpy())
        keep[rows[n:]] = False
    a = a[keep].copy()
    # category order not sorted: the replicate's split visits the groups in this order
    cats = list(a.obs["target_gene"].cat.categories)
    a.obs["target_gene"] = a.obs["target_gene"].cat.reorder_categories(cats[::-1])
    return a


def _submission(real: ad.AnnData, seed: int = 7) -> ad.AnnData:
    """Integer counts: per perturbation 4-20 cells resampled mostly from its own real cells; G005
    predicted as the context's real control cells (zero effect: an all-tied PDS row), G007 a copy
    of G006's cells; a few control cells."""
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(real.X)
    lab = real.obs["target_gene"].astype(str).to_numpy()
    ctx = real.obs["context"].astype(str).to_numpy()
    blocks, labels, contexts = [], [], []
    for c in CONTEXTS:
        in_c = ctx == c
        own_rows = {}
        for p in PERTS:
            own = np.flatnonzero(in_c & (lab == p))
            anyc = np.flatnonzero(in_c)
            n = int(rng.integers(4, 21))
            rows = np.where(rng.random(n) < 0.75, rng.choice(own, n), rng.choice(anyc, n))
            if p == "G005":
                rows = np.flatnonzero(in_c & (lab == CTRL))
            if p == "G007":
                rows = own_rows["G006"]
            own_rows[p] = rows
            blocks.append(X[rows])
            labels += [p] * rows.size
            contexts += [c] * rows.size
        ctrl = rng.choice(np.flatnonzero(in_c & (lab == CTRL)), 10, replace=False)
        blocks.append(X[ctrl])
        labels += [CTRL] * ctrl.size
        contexts += [c] * ctrl.size
    obs = pd.DataFrame(
        {"target_gene": pd.Categorical(labels), "context": contexts},
        index=[f"p{i}" for i in range(len(labels))],
    )
    return ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_screen):
    d = tmp_path_factory.mktemp("v2026")
    real = _reference(make_screen)
    real.write_h5ad(d / "real.h5ad")
    _submission(real).write_h5ad(d / "pred.h5ad")
    return d


@pytest.fixture(scope="module")
def evaluated(files):
    """The submission scored with a fresh bundle (built here, reused by the later tests)."""
    from celltwin.eval.v2026 import evaluate_2026

    ev = evaluate_2026(
        files / "pred.h5ad", files / "real.h5ad", context_col="context", bundle=files / "bundle"
    )
    assert not ev.bundle_reused
    return ev


def _context(a: ad.AnnData, c: str) -> C.ContextCounts:
    sub = a[a.obs["context"] == c]
    return C.ContextCounts(
        X=sp.csr_matrix(sub.X),
        perts=sub.obs["target_gene"].astype(str).to_numpy(),
        genes=[str(g) for g in sub.var_names],
    )


# ------------------------------------------------------------------------------- the scale, by hand
def test_scale_one_policies():
    b, r = 0.4, 0.9
    for m in (
        "pds_cosine",
        "de_wilcoxon_direction_fidelity_yield_raw",
        "de_wilcoxon_direction_reach_raw",
        "de_wilcoxon_sig_jaccard",
    ):
        assert S.scale_one(m, b, b, r) == 0.0
        assert S.scale_one(m, r, b, r) == pytest.approx(1.0)
        assert S.scale_one(m, 1.0, b, r) == pytest.approx(1.2)  # above the replicate: reported, not clipped
        assert S.scale_one(m, 0.0, b, r) == pytest.approx(-0.8)  # below the baseline: negative
        assert S.scale_one(m, math.nan, b, r) == pytest.approx(-0.8)  # missing: the metric's worst value 0
    m = "expr_mse_unbiased_capped_norm"  # lower is better, clamped to [0, 1]
    assert S.scale_one(m, 0.5, 0.9, 0.1) == pytest.approx(0.5)
    assert S.scale_one(m, 0.0, 0.9, 0.1) == 1.0
    assert S.scale_one(m, 1.5, 0.9, 0.1) == 0.0
    assert S.scale_one(m, None, 0.9, 0.1) == 0.0
    m = "de_wilcoxon_lfc_nmae"  # lower is better, linear, floored at -6
    assert S.scale_one(m, 0.4, 1.0, 0.4) == pytest.approx(1.0)
    assert S.scale_one(m, 0.0, 1.0, 0.4) == pytest.approx(1 + 0.4 / 0.6)  # no high clamp
    assert S.scale_one(m, 2.0, 1.0, 0.4) == pytest.approx(1 - 1.6 / 0.6)
    assert S.scale_one(m, 9.0, 1.0, 0.4) == -6.0
    assert S.scale_one(m, math.inf, 1.0, 0.4) == -6.0
    for m, b_, r_ in (
        ("pds_cosine", 0.5, 0.5),
        ("pds_cosine", 0.6, 0.5),
        ("de_wilcoxon_lfc_nmae", 0.4, 1.0),
        ("expr_mse_unbiased_capped_norm", math.nan, 0.1),
    ):
        with pytest.raises(S.ScaleError):
            S.scale_one(m, 0.3, b_, r_)
    s = {m: float(i) for i, m in enumerate(S.METRICS)}
    assert S.context_score(s) == pytest.approx(np.mean(list(s.values())))
    assert S.scale(
        dict.fromkeys(S.METRICS, 0.5),
        dict.fromkeys(S.METRICS, 0.5),
        {m: (0.1 if S.POLICIES[m].direction == "lower" else 0.9) for m in S.METRICS},
    ) == dict.fromkeys(S.METRICS, 0.0)


def test_seeds_halves_and_group_order():
    # numpy.random.SeedSequence(0).generate_state(5): the five split seeds of the competition rule
    assert R.derive_seeds() == [2968811710, 3677149159, 745650761, 2884920346, 2642120001]
    labels = np.array(["c"] * 7 + ["x"] * 1 + ["y"] * 4 + ["z"] * 5)
    X = sp.csr_matrix(np.arange(labels.size, dtype=np.float32)[:, None] + 1)
    cc = C.ContextCounts(X=X, perts=labels, genes=["g"])
    a, b = R.split_halves(cc, seed=3)
    va, vb = a.X.toarray().ravel(), b.X.toarray().ravel()
    assert not set(va) & set(vb)  # disjoint
    for lab, n in (("c", 3), ("x", 0), ("y", 2), ("z", 2)):  # floor(n/2); a 1-cell group is dropped
        assert (a.perts == lab).sum() == n == (b.perts == lab).sum()
    cat = pd.Categorical(["b", "a", "c", "a"], categories=["c", "d", "a", "b"])
    assert R.group_order(cat) == ["c", "a", "b"]
    assert R.group_order(["b", "a", "c"]) == ["a", "b", "c"]


def test_baseline_by_hand():
    # 2 genes; controls have means (2, 4); perturbation g0 (targets gene 0) and g1 (targets gene 1)
    X = np.array([[1, 3], [3, 5], [4, 8], [2, 2], [6, 9], [0, 7]], dtype=np.float32)
    labels = np.array([CTRL, CTRL, "g0", "g0", "g1", "g1"])
    cc = C.ContextCounts(X=sp.csr_matrix(X), perts=labels, genes=["g0", "g1"])
    prof = BL.baseline_profile(cc, control=CTRL)
    # gene 0 leaves out g0 (its own knockdown): mean of g1's mean 3; gene 1 leaves out g1: g0's 5
    np.testing.assert_array_equal(prof.values, [3.0, 5.0])
    bl = BL.build_baseline(cc, control=CTRL)
    np.testing.assert_array_equal(bl.perts, labels)
    Y = bl.X.toarray()
    np.testing.assert_array_equal(Y[:2], X[:2])  # the control rows are the real control cells
    ctrl = {tuple(r) for r in (X[:2] * np.array([3.0 / 2, 5.0 / 4])).astype(np.float32)}
    assert {tuple(r) for r in Y[2:]} <= ctrl  # every emitted cell: a scaled control cell
    assert bl.X.dtype == np.float32


# ------------------------------------------------------------------------------------ cell-eval2
def _ce2_config():
    from dataclasses import replace

    from cell_eval2.config import EvalConfig

    p = EvalConfig.from_preset("vcc2026")
    # device / DE backend / pert_col are outside the competition rule (its digest excludes them)
    return replace(p, pert_col="target_gene", device="cpu", de=replace(p.de, backend="pdex"), num_threads=1)


@pytest.mark.reference
def test_baseline_and_halves_bitwise_as_cell_eval2(files):
    pytest.importorskip("cell_eval2")
    from cell_eval2.baseline import build_baseline_prediction, generic_response_profile
    from cell_eval2.ceiling import _disjoint_halves

    real = ad.read_h5ad(files / "real.h5ad")
    for c in CONTEXTS:
        sub = real[real.obs["context"] == c].copy()
        cc = _context(real, c)
        prof = generic_response_profile(sub, pert_col="target_gene", control=CTRL)
        ref = build_baseline_prediction(prof, sub, pert_col="target_gene", control=CTRL)
        mine = BL.build_baseline(cc, control=CTRL)
        assert (sp.csr_matrix(ref.X) != mine.X).nnz == 0
        order = R.group_order(sub.obs["target_gene"])
        for seed in R.derive_seeds():
            ha, hb = _disjoint_halves(sub, "target_gene", CTRL, seed)
            ma, mb = R.split_halves(cc, seed=seed, order=order)
            for h, m in ((ha, ma), (hb, mb)):
                assert (sp.csr_matrix(h.X) != m.X).nnz == 0
                np.testing.assert_array_equal(h.obs["target_gene"].astype(str).to_numpy(), m.perts)


@pytest.fixture(scope="module")
def cell_eval2_scores(files):
    """cell-eval2 0.20.0, per context: build_generic_baseline -> build_real_bundle (baseline leg +
    replicate anchor) -> compute_metrics of the submission -> score_metrics(real_bundle=...)."""
    pytest.importorskip("cell_eval2")
    import logging

    import polars as pl
    from cell_eval2 import competition
    from cell_eval2.baseline import build_generic_baseline, build_run_meta
    from cell_eval2.real_bundle import build_real_bundle
    from cell_eval2.run import aggregate_metrics_wide, compute_metrics, metric_output_names
    from cell_eval2.score import score_metrics

    cfg = _ce2_config()
    real, pred = ad.read_h5ad(files / "real.h5ad"), ad.read_h5ad(files / "pred.h5ad")
    out = {}
    logging.disable(logging.WARNING)
    try:
        for c in CONTEXTS:
            d = files / f"ce2_{c}"
            d.mkdir()
            real[real.obs["context"] == c].copy().write_h5ad(d / "real.h5ad")
            pred[pred.obs["context"] == c].copy().write_h5ad(d / "pred.h5ad")
            build_generic_baseline(str(d / "real.h5ad"), config=cfg, save_pred=str(d / "baseline.h5ad"))
            man = build_real_bundle(
                str(d / "real.h5ad"),
                str(d / "baseline.h5ad"),
                config=cfg,
                outdir=str(d / "bundle"),
                bundle_id=c,
            )
            assert man["rule_digest"] == competition.competition_digest(), man["rule_mismatches"]
            tidy = compute_metrics(str(d / "pred.h5ad"), str(d / "real.h5ad"), config=cfg)
            agg = aggregate_metrics_wide(tidy, metrics=metric_output_names(cfg))
            meta = build_run_meta(cfg, str(d / "real.h5ad"), str(d / "pred.h5ad"))
            scored = score_metrics(agg, real_bundle=str(d / "bundle"), user_meta=meta)
            base = pl.read_csv(d / "bundle" / "baseline_agg.csv").filter(pl.col("statistic") == "mean")
            anchor = pl.read_parquet(d / "bundle" / "anchor_agg.parquet")
            splits = pl.read_parquet(d / "bundle" / "anchor_splits.parquet")
            umean = agg.filter(pl.col("statistic") == "mean")
            out[c] = {
                "u": {m: umean[m][0] for m in S.METRICS},
                "b": {m: base[m][0] for m in S.METRICS},
                "r": dict(zip(anchor["metric"].to_list(), anchor["replicate"].to_list(), strict=True)),
                "splits": {
                    (int(i), m): v for i, m, v in splits.select("split_index", "metric", "value").iter_rows()
                },
                "s": dict(zip(scored["metric"].to_list(), scored["from_replicate"].to_list(), strict=True)),
            }
    finally:
        logging.disable(logging.NOTSET)
    return out


@pytest.mark.reference
def test_b_r_s_match_cell_eval2(evaluated, cell_eval2_scores):
    worst = 0.0
    for c in CONTEXTS:
        ref = cell_eval2_scores[c]
        got = evaluated.metrics[evaluated.metrics["context"] == c].set_index("metric")
        for m in S.METRICS:
            for col in ("u", "b", "r", "s"):
                want = ref[col][m]
                assert got.loc[m, col] == pytest.approx(want, abs=TOL, rel=0), (c, m, col)
                worst = max(worst, abs(got.loc[m, col] - want))
        for row in evaluated.scales[c].splits:
            want = ref["splits"][(row["split_index"], row["metric"])]
            assert row["value"] == pytest.approx(want, abs=TOL, rel=0), (c, row)
        assert evaluated.context_scores[c] == pytest.approx(ref["s"]["avg_score"], abs=TOL, rel=0)
    want = np.mean([cell_eval2_scores[c]["s"]["avg_score"] for c in CONTEXTS])
    assert evaluated.score == pytest.approx(want, abs=TOL, rel=0)
    print(f"max |celltwin - cell-eval2| over u, b, r, s: {worst:.3e}")


# ---------------------------------------------------------------------------------------- bundle
def test_bundle_round_trip(files, evaluated, tmp_path):
    from celltwin.eval.v2026 import evaluate_2026
    from celltwin.eval.v2026._bundle import BundleMismatchError, ReferenceBundle

    again = evaluate_2026(
        files / "pred.h5ad", files / "real.h5ad", context_col="context", bundle=files / "bundle"
    )
    assert again.bundle_reused
    # b, r and the prepared reference statistics come from the bundle: the same numbers, bit for bit
    pd.testing.assert_frame_equal(again.metrics, evaluated.metrics, check_exact=True)
    assert again.context_scores == evaluated.context_scores and again.score == evaluated.score
    for c in CONTEXTS:
        pd.testing.assert_frame_equal(again.per_pert[c], evaluated.per_pert[c], check_exact=True)
    assert len(list((files / "bundle").glob("ctx-*/real_stats.npz"))) == len(CONTEXTS)
    stored = ReferenceBundle.open(files / "bundle").load(
        "A", real=_context(ad.read_h5ad(files / "real.h5ad"), "A")
    )
    assert stored.real_stats is not None and stored.b == evaluated.scales["A"].b
    manifest = json.loads((files / "bundle" / "manifest.json").read_text())
    assert sorted(c["context"] for c in manifest["contexts"]) == list(CONTEXTS)

    # the same reference stored dense: the same content digest, the bundle is reused, same numbers
    dense = ad.read_h5ad(files / "real.h5ad")
    dense.X = np.asarray(dense.X.toarray())
    dense.write_h5ad(tmp_path / "dense.h5ad")
    d = evaluate_2026(
        files / "pred.h5ad", tmp_path / "dense.h5ad", context_col="context", bundle=files / "bundle"
    )
    assert d.bundle_reused
    pd.testing.assert_frame_equal(d.metrics, evaluated.metrics, check_exact=True)

    # another reference: one count changed in context B
    other = ad.read_h5ad(files / "real.h5ad")
    X = sp.csr_matrix(other.X).copy()
    row = next(
        r for r in np.flatnonzero(other.obs["context"].to_numpy() == "B") if X.indptr[r + 1] > X.indptr[r]
    )
    X.data[X.indptr[row]] += 1
    other.X = X
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(BundleMismatchError, match="other reference data"):
        evaluate_2026(
            files / "pred.h5ad", tmp_path / "other.h5ad", context_col="context", bundle=files / "bundle"
        )
    # the same reference without its context column: other contexts
    with pytest.raises(BundleMismatchError, match="other reference data"):
        evaluate_2026(files / "pred.h5ad", files / "real.h5ad", bundle=files / "bundle")
    # another configuration
    with pytest.raises(BundleMismatchError, match="another configuration"):
        evaluate_2026(
            files / "pred.h5ad",
            files / "real.h5ad",
            context_col="context",
            bundle=files / "bundle",
            n_splits=3,
        )
    # a directory that is not a bundle
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(Exception, match="not a celltwin vcc2026 reference bundle"):
        evaluate_2026(
            files / "pred.h5ad", files / "real.h5ad", context_col="context", bundle=tmp_path / "junk"
        )


# ------------------------------------------------------------------------------------------- CLI
def _pair(files):
    return ["-ap", files / "pred.h5ad", "-ar", files / "real.h5ad"]


def _cli(capsys, *argv):
    code = main(["eval", "--profile", "vcc2026", *map(str, argv)])
    return code, capsys.readouterr()


def test_cli_end_to_end(files, evaluated, tmp_path, capsys):
    from celltwin.eval.v2026 import evaluate_2026

    out = tmp_path / "out"
    code, cap = _cli(
        capsys,
        *_pair(files),
        "--context-col",
        "context",
        "--bundle",
        files / "bundle",
        "--write-baseline",
        tmp_path / "baseline.h5ad",
        "-o",
        out,
    )
    assert code == 0, cap.err
    assert "reused bundle" in cap.err
    assert sorted(p.name for p in out.iterdir()) == [
        "agg_results.csv",
        "replicate_splits.csv",
        "results.csv",
        "score.json",
    ]
    agg = pd.read_csv(out / "agg_results.csv", float_precision="round_trip")
    assert agg.columns.tolist() == ["context", "metric", "u", "b", "r", "s"]
    np.testing.assert_array_equal(
        agg[["u", "b", "r", "s"]].to_numpy(), evaluated.metrics[["u", "b", "r", "s"]].to_numpy()
    )
    res = pd.read_csv(out / "results.csv")
    assert res.columns[:2].tolist() == ["context", "perturbation"]
    assert sorted(set(res["perturbation"])) == PERTS
    summary = json.loads((out / "score.json").read_text())
    assert summary["score"] == evaluated.score
    assert summary["context_scores"] == {c: evaluated.context_scores[c] for c in CONTEXTS}
    assert cap.out.strip().splitlines()[-1] == f"score\t{summary['score']:.6f}"
    splits = pd.read_csv(out / "replicate_splits.csv")
    assert len(splits) == len(CONTEXTS) * R.N_SPLITS * len(S.METRICS)

    # the same file from the API
    from celltwin.eval.v2026 import write_baseline

    write_baseline(files / "real.h5ad", tmp_path / "baseline2.h5ad", context_col="context")
    b2 = ad.read_h5ad(tmp_path / "baseline2.h5ad")
    assert (sp.csr_matrix(b2.X) != sp.csr_matrix(ad.read_h5ad(tmp_path / "baseline.h5ad").X)).nnz == 0
    pd.testing.assert_frame_equal(b2.obs, ad.read_h5ad(tmp_path / "baseline.h5ad").obs)

    # the written baseline, scored as a submission (without the integral-counts rule): u = b, s = 0
    base = ad.read_h5ad(tmp_path / "baseline.h5ad")
    assert base.n_obs == ad.read_h5ad(files / "real.h5ad").n_obs and base.X.dtype == np.float32
    ev = evaluate_2026(
        tmp_path / "baseline.h5ad",
        files / "real.h5ad",
        context_col="context",
        bundle=files / "bundle",
        validate=False,
    )
    np.testing.assert_array_equal(ev.metrics["u"].to_numpy(), ev.metrics["b"].to_numpy())
    assert (ev.metrics["s"] == 0).all()


def _bad(files: Path, tmp: Path, kind: str) -> Path:
    pred = ad.read_h5ad(files / "pred.h5ad")
    X = sp.csr_matrix(pred.X).astype(np.float32)
    if kind == "fractional":
        X.data[0] += 0.5
    elif kind == "cell total":
        X.data[X.indptr[3]] = 2e6
    elif kind == "negative":
        X.data[1] = -1
    pred.X = X
    if kind == "missing context":
        pred = pred[pred.obs["context"] == "A"].copy()
    elif kind == "unknown gene":
        pred.var_names = ["NOT_A_GENE", *GENES[1:]]
    elif kind == "missing perturbation":
        pred = pred[pred.obs["target_gene"] != "G010"].copy()
    p = tmp / f"{kind.replace(' ', '_')}.h5ad"
    pred.write_h5ad(p)
    return p


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("fractional", "integ"),
        ("negative", "negative"),
        ("cell total", "1e6|1000000|total"),
        ("missing context", "context"),
        ("unknown gene", "NOT_A_GENE"),
        ("missing perturbation", "G010"),
    ],
)
def test_cli_bad_input_exits_2(files, tmp_path, capsys, kind, needle):
    pred = _bad(files, tmp_path, kind)
    code, cap = _cli(
        capsys,
        "-ap",
        pred,
        "-ar",
        files / "real.h5ad",
        "--context-col",
        "context",
        "--bundle",
        tmp_path / "new_bundle",
        "-o",
        tmp_path / "out",
    )
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("celltwin eval: error:"), cap.err
    assert re.search(needle, lines[0], flags=re.I), lines[0]
    assert not (tmp_path / "new_bundle").exists() and not (tmp_path / "out").exists()


def test_cli_refusals(files, tmp_path, capsys):
    code, cap = _cli(
        capsys,
        *_pair(files),
        "--skip-metrics",
        "pds_cosine",
        "-o",
        tmp_path / "o",
    )
    assert code == 2 and "does not take --skip-metrics" in cap.err
    code, cap = _cli(
        capsys,
        *_pair(files),
        "--context-col",
        "nope",
        "-o",
        tmp_path / "o",
    )
    assert code == 2 and "nope" in cap.err
    code = main(
        [
            "eval",
            "-ap",
            str(files / "pred.h5ad"),
            "-ar",
            str(files / "real.h5ad"),
            "--bundle",
            str(tmp_path / "b"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "only with --profile vcc2026" in capsys.readouterr().err
