"""`celltwin eval` / `celltwin score` through the CLI: outputs, bad input (exit 2, one line), no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ad = pytest.importorskip("anndata")

from celltwin.cli import main

CTRL = "non-targeting"


def _adata(X, labels=None, genes=None, col="target_gene"):
    n, g = X.shape
    labels = labels if labels is not None else [CTRL] * 6 + ["A"] * 4 + ["B"] * 4
    a = ad.AnnData(X)
    a.obs[col] = pd.Categorical(labels)
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = genes if genes is not None else [f"g{i}" for i in range(g)]
    return a


def _screen(make_screen, seed=0, fmt="csr"):
    """6 controls + 4 A + 4 B cells x 8 genes (g0..g7), Poisson(3) counts, float32; obs_names c0..c13."""
    return make_screen(seed, n_genes=8, perts=("A", "B"), n_per=4, n_ctrl=6, categorical=True, cell_prefix="c",
                       base=3.0, size_factor=None, effect=None, fmt=fmt)


@pytest.fixture
def good(tmp_path, make_screen):
    real = tmp_path / "real.h5ad"
    pred = tmp_path / "pred.h5ad"
    _screen(make_screen, 0).write_h5ad(real)
    _screen(make_screen, 1).write_h5ad(pred)
    return real, pred


def _run(capsys, *argv):
    code = main(["eval", "--no-progress", "--no-cache", *map(str, argv)])
    return code, capsys.readouterr()


def test_eval_and_score_cli(good, tmp_path, capsys):
    real, pred = good
    out = tmp_path / "out"
    code, cap = _run(capsys, "--pred", pred, "--real", real, "-o", out)
    assert code == 0, cap.err
    res = pd.read_csv(out / "results.csv")
    assert res.columns.tolist() == ["perturbation", "overlap_at_N", "mae", "discrimination_score_l1"]
    assert res["perturbation"].tolist() == ["A", "B"]
    assert "discrimination_score_l1" in cap.out
    code = main(
        [
            "score",
            "-i",
            str(out / "agg_results.csv"),
            "-I",
            str(out / "agg_results.csv"),
            "-o",
            str(tmp_path / "s.csv"),
        ]
    )
    assert code == 0
    s = pd.read_csv(tmp_path / "s.csv")
    # user == baseline: mae scores 1 - 1 = 0 and the others (u - b)/(1 - b) = 0
    assert s["metric"].tolist()[-1] == "avg_score" and np.allclose(s["from_baseline"], 0.0)


def _bad(tmp_path, real_a, pred_a, name="x"):
    real, pred = tmp_path / f"real_{name}.h5ad", tmp_path / f"pred_{name}.h5ad"
    real_a.write_h5ad(real)
    pred_a.write_h5ad(pred)
    return real, pred


def _case(make_screen, name):
    X = _screen(make_screen, 1, fmt="dense").X
    if name == "missing_col":
        return _adata(X, col="perturbation")
    if name == "missing_control":
        return _adata(X, labels=["ctrl"] * 6 + ["A"] * 4 + ["B"] * 4)
    if name == "pert_sets":
        return _adata(X, labels=[CTRL] * 6 + ["A"] * 4 + ["C"] * 4)
    if name == "gene_order":
        return _adata(X, genes=[f"g{i}" for i in [1, 0, 2, 3, 4, 5, 6, 7]])
    if name == "gene_set":
        return _adata(X, genes=[f"g{i}" for i in range(7)] + ["zz"])
    if name == "dup_genes":
        return _adata(X, genes=[f"g{i}" for i in range(7)] + ["g0"])
    if name == "nan":
        X[2, 3] = np.nan
        return _adata(X)
    if name == "inf":
        X[2, 3] = np.inf
        return _adata(X)
    if name == "neg_int":
        Xi = X.astype(np.int32)
        Xi[1, 1] = -2
        return _adata(Xi)
    if name == "neg_float":
        L = np.log1p(X)
        L[1, 1] = -0.5
        return _adata(L)
    if name == "mixed":
        L = np.log1p(X)
        L[0, :] = X[0, :] + 20
        return _adata(L)
    if name == "float16":
        return _adata(np.log1p(X).astype(np.float16))
    if name == "empty_label":
        return _adata(X, labels=[CTRL] * 6 + ["A"] * 4 + ["B"] * 3 + [""])
    raise AssertionError(name)


BAD = {
    "missing_col": "obs column 'target_gene' not found",
    "missing_control": "control label 'non-targeting' not found",
    "pert_sets": "different perturbation set",
    "gene_order": "--reorder-genes",
    "gene_set": "var_names differ",
    "dup_genes": "duplicated gene name",
    "nan": "non-finite",
    "inf": "non-finite",
    "neg_int": "negative values",
    "neg_float": "negative values",
    "mixed": "mixes counts and log values",
    "float16": "float16",
    "empty_label": "empty or missing label",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exit_2(name, tmp_path, capsys, make_screen):
    real, pred = _bad(tmp_path, _screen(make_screen, 0), _case(make_screen, name), name)
    out = tmp_path / "out"
    code, cap = _run(capsys, "--pred", pred, "--real", real, "-o", out)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert BAD[name] in lines[0] and str(pred) in lines[0]
    assert not out.exists()  # nothing written


def test_gene_order_reorder_flag(tmp_path, capsys, make_screen):
    real, pred = _bad(tmp_path, _screen(make_screen, 0), _case(make_screen, "gene_order"), "reorder")
    code, cap = _run(
        capsys, "--pred", pred, "--real", real, "-o", tmp_path / "o", "--reorder-genes", "--no-report"
    )
    assert code == 0, cap.err


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_file(kind, good, tmp_path, capsys):
    real, _ = good
    bad = tmp_path / f"{kind}.h5ad"
    if kind == "truncated":
        data = real.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("perturbation,gene\nA,1\n")
    code, cap = _run(capsys, "--pred", bad, "--real", real, "-o", tmp_path / "o")
    assert code == 2
    assert len(cap.err.strip().splitlines()) == 1 and "not a readable .h5ad" in cap.err


def test_missing_file(good, tmp_path, capsys):
    real, _ = good
    code, cap = _run(capsys, "--pred", tmp_path / "nope.h5ad", "--real", real, "-o", tmp_path / "o")
    assert code == 2 and "file not found" in cap.err


def test_help_and_import_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import celltwin.eval\n"
        "from celltwin.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['eval', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'discrimination_score_l1' in buf.getvalue() and '--control-source' in buf.getvalue()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_de_cache(good, tmp_path, capsys):
    real, pred = good
    cache = tmp_path / "cache"
    for i in range(2):
        code = main(
            [
                "eval",
                "--no-progress",
                "--no-report",
                "--cache-dir",
                str(cache),
                "--pred",
                str(pred),
                "--real",
                str(real),
                "-o",
                str(tmp_path / f"o{i}"),
            ]
        )
        assert code == 0, capsys.readouterr().err
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) == 1  # only the real side is cached, once
    assert (tmp_path / "o0" / "results.csv").read_text() == (tmp_path / "o1" / "results.csv").read_text()
    # the second run's real DE table came from the cache: same rows, names, dtypes and bits
    import pandas as pd

    computed = pd.read_parquet(tmp_path / "o0" / "real_de.parquet")
    cached = pd.read_parquet(tmp_path / "o1" / "real_de.parquet")
    pd.testing.assert_frame_equal(cached, computed, check_exact=True)
    assert len(computed) > 0 and computed["feature"].astype(str).str.len().min() > 0


def test_cell_eval_spellings_skip_metrics_and_de_tables(good, tmp_path, capsys):
    """cell-eval's `run` spellings: -ap/-ar/--control-pert/--skip-metrics/-dp/-dr/--num-threads."""
    real, pred = good
    first = tmp_path / "first"
    code, cap = _run(capsys, "--pred", pred, "--real", real, "-o", first, "--de-format", "csv", "--no-report")
    assert code == 0, cap.err
    out = tmp_path / "out"
    code, cap = _run(
        capsys,
        "-ap", pred, "-ar", real, "--control-pert", CTRL, "--skip-metrics", "mae",
        "-dp", first / "pred_de.csv", "-dr", first / "real_de.csv", "--num-threads", "1", "-o", out,
    )  # fmt: skip
    assert code == 0, cap.err
    res = pd.read_csv(out / "results.csv")
    assert res.columns.tolist() == ["perturbation", "overlap_at_N", "discrimination_score_l1"]
    ref = pd.read_csv(first / "results.csv")
    pd.testing.assert_frame_equal(res, ref.drop(columns="mae"), check_exact=True)
    assert (out / "report.md").exists() and (out / "real_de.parquet").exists()
    # the precomputed tables are written back unchanged (CSV round trip is exact)
    code, cap = _run(capsys, "-ap", pred, "-ar", real, "-dp", first / "pred_de.csv", "-dr", first / "real_de.csv",
                     "--de-format", "csv", "--no-report", "-o", tmp_path / "again")  # fmt: skip
    assert code == 0, cap.err
    for name in ("real_de.csv", "pred_de.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes()


def test_eval_option_errors(good, tmp_path, capsys):
    real, pred = good
    code, cap = _run(capsys, "-ap", pred, "-ar", real, "--skip-metrics", "mae,nope", "-o", tmp_path / "o")
    assert code == 2 and len(cap.err.strip().splitlines()) == 1
    assert "unknown metric 'nope'" in cap.err and "discrimination_score_l1" in cap.err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    code, cap = _run(capsys, "-ap", pred, "-ar", real, "-dr", bad, "-o", tmp_path / "o")
    assert code == 2 and "-dr/--de-real" in cap.err and "missing DE column" in cap.err
    code, cap = _run(capsys, "-ap", pred, "-ar", real, "-dp", tmp_path / "nope.csv", "-o", tmp_path / "o")
    assert code == 2 and "file not found" in cap.err
    with pytest.raises(SystemExit) as e:
        _run(capsys, "-ap", pred, "-ar", real, "--num-threads", "0", "-o", tmp_path / "o")
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_eval_aliases_parse_alike():
    from celltwin.cli import build_parser

    parser = build_parser()
    base = ["eval", "-o", "o"]
    spellings = [
        ["--pred", "p.h5ad", "--real", "r.h5ad", "--control", "ctl"],
        ["-ap", "p.h5ad", "-ar", "r.h5ad", "--control-pert", "ctl"],
        ["--adata-pred", "p.h5ad", "--adata-real", "r.h5ad", "--control-pert", "ctl"],
    ]
    got = [vars(parser.parse_args(base + s)) for s in spellings]
    for g in got:
        assert (g["pred"], g["real"], g["control"]) == ("p.h5ad", "r.h5ad", "ctl")
    a = parser.parse_args(
        base + spellings[0] + ["-dp", "dp.csv", "-dr", "dr.csv", "--skip-metrics", "mae,mse"]
    )
    b = parser.parse_args(base + spellings[0] + ["--de-pred", "dp.csv", "--de-real", "dr.csv"])
    assert (a.de_pred, a.de_real, a.skip_metrics) == ("dp.csv", "dr.csv", "mae,mse")
    assert (b.de_pred, b.de_real, b.num_threads) == ("dp.csv", "dr.csv", None)


def test_eval_profile_choices_are_the_registrys():
    from celltwin.commands.eval import PROFILES as cli_profiles
    from celltwin.eval import PROFILES

    assert list(cli_profiles) == list(PROFILES)
