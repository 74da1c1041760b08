"""Perturbation labels, column checks, gene-id mapping and the knockdown filter."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celltwin.data import (
    HgncTable,
    ObsColumns,
    knockdown_filter,
    map_genes,
    parse_perturbation,
    require_columns,
)
from celltwin.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_parse_perturbation():
    assert parse_perturbation("A+B") == ("A", "B")
    assert parse_perturbation("A") == ("A",)
    assert parse_perturbation("non-targeting") == ()
    assert parse_perturbation("ctrl", control_label="ctrl") == ()
    assert parse_perturbation(" B + A ") == ("B", "A")
    assert parse_perturbation("A+") == ("A",)
    assert parse_perturbation("A_B", sep="_") == ("A", "B")


def test_columns_checks():
    obs = pd.DataFrame({"target_gene": ["A", "non-targeting"], "cell_line": ["x", "x"]})
    with pytest.raises(
        InputError,
        match=r"f.h5ad: obs column\(s\) 'context' not found; available columns: "
        r"target_gene, cell_line",
    ):
        ObsColumns(batch_col=None).check(obs, "f.h5ad")
    cols = ObsColumns().present(obs)
    assert cols.context_col is None and cols.batch_col is None
    cols.check(obs, "f.h5ad")
    assert list(cols.contexts(obs)) == ["all", "all"]
    np.testing.assert_array_equal(cols.is_control(obs), [False, True])
    with pytest.raises(InputError, match=r"no control cells.*'ctrl'; first labels present: A, non-targeting"):
        ObsColumns(control_label="ctrl", context_col=None, batch_col=None).check(obs, "f.h5ad")
    require_columns(obs, [None, "cell_line"], "f")
    assert ObsColumns.from_dict(cols.to_dict()) == cols


TABLE = pd.DataFrame(
    {
        "Approved symbol": ["TP53", "KMT2A", "SEPTIN7", "GENEX", "GENEY"],
        "Ensembl gene ID": [
            "ENSG00000141510",
            "ENSG00000118058",
            "ENSG00000122545",
            "ENSG00000000001",
            "ENSG00000000001",
        ],
        "Alias symbol": ["p53|LFS1", "MLL|HRX", "", "SHARED", "SHARED"],
        "Previous symbol": ["", "MLL1", "SEPT7", "OLDX", ""],
    }
)


@pytest.fixture
def table_path(tmp_path):
    p = tmp_path / "hgnc.tsv"
    TABLE.to_csv(p, sep="\t", index=False)
    return p


def test_map_genes_rules(table_path):
    names = ["TP53", "tp53", "SEPT7", "MLL", "ENSG00000118058.12", "SHARED", "ENSG00000000001", "NOPE", "p53"]
    m = map_genes(names, table_path)
    t = m.table.set_index("input")
    assert t.loc["TP53", "mapped"] == "TP53" and t.loc["TP53", "rule"] == "approved"
    assert t.loc["tp53", "mapped"] == "TP53" and t.loc["tp53", "rule"] == "approved_ci"
    assert t.loc["SEPT7", "mapped"] == "SEPTIN7" and t.loc["SEPT7", "rule"] == "previous"
    assert t.loc["MLL", "mapped"] == "KMT2A" and t.loc["MLL", "rule"] == "alias"
    assert t.loc["ENSG00000118058.12", "mapped"] == "KMT2A"
    assert t.loc["SHARED", "status"] == "ambiguous" and t.loc["SHARED", "candidates"] == "GENEX|GENEY"
    assert t.loc["ENSG00000000001", "status"] == "ambiguous"
    assert t.loc["NOPE", "status"] == "unmapped"
    assert m.counts() == {"mapped": 6, "unmapped": 1, "ambiguous": 2, "duplicates": 2}
    assert m.duplicates == {"KMT2A": ["MLL", "ENSG00000118058.12"], "TP53": ["TP53", "tp53", "p53"]}
    rep = m.report()
    assert "9 genes: 6 mapped, 1 unmapped, 2 ambiguous" in rep and "unmapped: NOPE" in rep
    ens = map_genes(["SEPT7", "GENEY"], HgncTable.from_tsv(table_path), to="ensembl")
    assert ens.table["mapped"].tolist() == ["ENSG00000122545", "ENSG00000000001"]


def test_gene_table_errors(tmp_path):
    with pytest.raises(InputError, match="gene table not found"):
        HgncTable.from_tsv(tmp_path / "none.tsv")
    p = tmp_path / "bad.tsv"
    TABLE.drop(columns=["Previous symbol"]).to_csv(p, sep="\t", index=False)
    with pytest.raises(InputError, match=r"lacks column\(s\) 'Previous symbol'; available: Approved symbol"):
        HgncTable.from_tsv(p)


@pytest.mark.shared
def test_map_genes_real_hgnc_table():
    path = SHARED / "annotation" / "hgnc_genes.tsv"
    if not path.exists():
        pytest.skip("../shared/data absent")
    m = map_genes(["TP53", "ENSG00000141510", "SEPT7", "MLL", "NOT_A_GENE_X"], path)
    t = m.table.set_index("input")
    assert t.loc["ENSG00000141510", "mapped"] == "TP53"
    assert t.loc["SEPT7", "mapped"] == "SEPTIN7"
    assert t.loc["MLL", "mapped"] == "KMT2A"
    assert t.loc["NOT_A_GENE_X", "status"] == "unmapped"


def test_knockdown_filter_hand_built():
    # genes: A, B, Z. Library size of every cell is 10 -> normalised value = counts (T = 10).
    X = np.array(
        [
            [4, 4, 2],  # ctrl c1
            [4, 4, 2],  # ctrl c1       -> reference A = 4, B = 4 in c1
            [2, 4, 4],  # A, c1: 2 <= 0.5 * 4 -> kept
            [3, 4, 3],  # A, c1: 3 > 2 -> dropped
            [0, 0, 10],  # A+B, c1: both reduced -> kept
            [0, 5, 5],  # A+B, c1: B not reduced -> dropped
            [5, 5, 0],  # Q (not measured), c1 -> kept, unassessed
            [0, 5, 5],  # ctrl c2       -> reference A = 0 in c2
            [0, 5, 5],  # A, c2: reference 0 -> kept, unassessed
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {
            "target_gene": ["nt", "nt", "A", "A", "A+B", "A+B", "Q", "nt", "A"],
            "line": ["c1"] * 7 + ["c2"] * 2,
        },
        index=[f"c{i}" for i in range(9)],
    )
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=["A", "B", "Z"]))
    cols = ObsColumns(control_label="nt", context_col="line", batch_col=None)
    res = knockdown_filter(a, cols, max_residual=0.5)
    np.testing.assert_array_equal(res.keep, [1, 1, 1, 0, 1, 0, 1, 1, 1])
    assert res.n_dropped == 2 and res.n_unassessed == 2
    assert res.per_perturbation.loc["A"].tolist() == [3, 1, 1]
    assert res.per_perturbation.loc["A+B"].tolist() == [2, 1, 0]
    np.testing.assert_array_equal(res.kept_rows, [0, 1, 2, 4, 6, 7, 8])
    # log-normalised input gives the same decisions (expm1 of log1p(counts / total * 1e4))
    b = a.copy()
    b.X = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    np.testing.assert_array_equal(knockdown_filter(b, cols).keep, res.keep)
    # a stricter threshold drops the borderline cell 2 as well
    assert knockdown_filter(a, cols, max_residual=0.4).n_dropped == 3


def test_knockdown_on_simulated_knockdown(make_adata):
    a = make_adata(knock=0.0)  # targets fully silenced: nothing dropped
    res = knockdown_filter(a, ObsColumns(context_col="cell_type"))
    assert res.n_dropped == 0 and res.n_unassessed == 0
    a = make_adata(knock=1.0)  # no knockdown at all: most perturbed cells dropped
    res = knockdown_filter(a, ObsColumns(context_col="cell_type"))
    n_pert = int((a.obs["target_gene"] != "non-targeting").sum())
    assert res.n_dropped > 0.6 * n_pert
