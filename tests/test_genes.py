"""Gene embeddings: FASTA parsing, residue / isoform pooling (numbers), ESM-2 on a tiny random model,
table formats, HGNC symbol mapping and coverage reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from celltwin.errors import InputError
from celltwin.genes import (
    GeneTable,
    HgncIndex,
    align_gene_table,
    load_gene_table,
    save_gene_table,
)
from celltwin.protein_embed import parse_fasta_header, pool_isoforms, read_fasta

torch = pytest.importorskip("torch")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# ------------------------------------------------------------------------------------ FASTA


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            ">sp|P04637-2|P53_HUMAN Isoform 2 of Cellular tumor antigen p53 OS=Homo sapiens GN=TP53 PE=1",
            ("TP53", "P04637-2"),
        ),
        (
            ">tr|A0A024R161|A0A024R161_HUMAN Guanine OS=Homo sapiens GN=DNAJC25-GNG10 PE=3",
            ("DNAJC25-GNG10", "A0A024R161"),
        ),
        (
            ">ENSP00000269305.4 pep chromosome:GRCh38:17 gene:ENSG00000141510 gene_symbol:TP53 description:x",
            ("TP53", "ENSP00000269305.4"),
        ),
        (">TP53|isoform2 some text", ("TP53", "isoform2")),
        (">KRAS", ("KRAS", "KRAS")),
    ],
)
def test_parse_fasta_header_forms(header, expected):
    assert parse_fasta_header(header) == expected


def test_parse_fasta_header_uniprot_without_gn_is_an_error():
    with pytest.raises(InputError, match="no GN="):
        parse_fasta_header(">sp|P99999|CYC_HUMAN Cytochrome c OS=Homo sapiens")


def test_read_fasta_multiline_and_stop(tmp_path):
    fa = tmp_path / "p.fa"
    fa.write_text(">A|1\nmkv\nLL*\n\n>A|2\nMK\n>B\nWW\n")
    recs = read_fasta(fa)
    assert [(r.gene, r.isoform, r.sequence) for r in recs] == [
        ("A", "1", "MKVLL"),
        ("A", "2", "MK"),
        ("B", "B", "WW"),
    ]
    bad = tmp_path / "bad.fa"
    bad.write_text("MKV\n>A\nMK\n")
    with pytest.raises(InputError, match="before the first"):
        read_fasta(bad)


# ---------------------------------------------------------------------------------- pooling


def test_pool_residues_excludes_special_tokens_and_padding():
    from celltwin.protein_embed import pool_residues

    # seq 0: <cls> r1 r2 <eos> <pad>; seq 1: <cls> r1 r2 r3 <eos>
    hidden = torch.tensor(
        [[[100.0, 0], [1, 2], [3, 4], [100, 0], [-50, 7]], [[100.0, 0], [1, 1], [2, 2], [6, 3], [100, 0]]]
    )
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    special = torch.tensor([[1, 0, 0, 1, 1], [1, 0, 0, 0, 1]])
    out = pool_residues(hidden, attn, special)
    np.testing.assert_allclose(out.numpy(), [[2.0, 3.0], [3.0, 2.0]])


def test_pool_isoforms_averages_per_gene_in_first_appearance_order():
    vec = np.array([[1.0, 2.0], [3.0, 6.0], [10.0, 10.0], [0.0, 1.0]], dtype=np.float32)
    t = pool_isoforms(["B", "A", "B", "B"], vec)
    assert t.genes == ["B", "A"]
    np.testing.assert_allclose(t.vectors, [[11 / 3, 13 / 3], [3.0, 6.0]], rtol=1e-6)


# ----------------------------------------------------------------------- ESM-2 (tiny, random)

_ESM_VOCAB = [
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    *"LAGVSERTIDPKQNFYMHWCXBUZO",
    ".",
    "-",
    "<null_1>",
    "<mask>",
]


@pytest.fixture(scope="module")
def tiny_esm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("esm")
    (d / "vocab.txt").write_text("\n".join(_ESM_VOCAB) + "\n")
    tok = transformers.EsmTokenizer(str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.EsmConfig(
        vocab_size=len(_ESM_VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=1,
        mask_token_id=len(_ESM_VOCAB) - 1,
        position_embedding_type="rotary",
        token_dropout=False,
    )
    model = transformers.EsmModel(cfg, add_pooling_layer=False)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d, model.eval()


def _manual_isoform(model, seq: str) -> np.ndarray:
    ids = torch.tensor([[0, *[_ESM_VOCAB.index(c) for c in seq], 2]])  # <cls> residues <eos>, no padding
    with torch.no_grad():
        h = model(input_ids=ids).last_hidden_state[0]  # (T, D)
    return h[1:-1].mean(0).numpy()


def test_embed_fasta_matches_manual_pooling(tiny_esm, tmp_path):
    from celltwin.protein_embed import embed_fasta

    d, model = tiny_esm
    fa = tmp_path / "p.fa"
    seqs = {"G1|a": "MKVLLAG", "G1|b": "MKW", "G2|x": "MSTNPKPQRKTKRNTNRRPQDVKFPGG"}
    fa.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    t = embed_fasta(fa, d, batch_size=3, device="cpu")  # one padded batch: padding must not leak
    assert t.genes == ["G1", "G2"] and t.dim == 16
    g1 = (_manual_isoform(model, "MKVLLAG") + _manual_isoform(model, "MKW")) / 2
    np.testing.assert_allclose(t.vectors[0], g1, atol=1e-5)
    np.testing.assert_allclose(t.vectors[1], _manual_isoform(model, seqs["G2|x"]), atol=1e-5)
    t1 = embed_fasta(fa, d, batch_size=1, device="cpu")
    np.testing.assert_allclose(t1.vectors, t.vectors, atol=1e-5)
    # truncation keeps the first residues
    t_trunc = embed_fasta(fa, d, batch_size=2, max_residues=3, device="cpu")
    np.testing.assert_allclose(t_trunc.vectors[1], _manual_isoform(model, "MST"), atol=1e-5)


def test_cli_genes_embed_and_coverage(tiny_esm, tmp_path, capsys):
    import anndata as ad
    import scipy.sparse as sp

    from celltwin.cli import main

    d, _ = tiny_esm
    fa = tmp_path / "p.fa"
    fa.write_text(">sp|P1|X_HUMAN x OS=Homo sapiens GN=AAA PE=1\nMKV\n>BBB|1\nMWW\n")
    out = tmp_path / "g.safetensors"
    assert (
        main(["genes", "embed", "--fasta", str(fa), "--model", str(d), "-o", str(out), "--no-progress"]) == 0
    )
    t = load_gene_table(out)
    assert t.genes == ["AAA", "BBB"] and t.vectors.shape == (2, 16)
    data = tmp_path / "d.h5ad"
    adata = ad.AnnData(sp.csr_matrix(np.ones((2, 3), np.float32)))
    adata.var_names = ["AAA", "CCC", "BBB"]
    adata.write_h5ad(data)
    miss = tmp_path / "missing.txt"
    assert main(["genes", "coverage", str(out), str(data), "--missing", str(miss)]) == 0
    assert "2/3 genes" in capsys.readouterr().out
    assert miss.read_text() == "CCC\n"


def test_embed_fasta_missing_model_dir(tmp_path):
    from celltwin.protein_embed import embed_fasta

    fa = tmp_path / "p.fa"
    fa.write_text(">A\nMK\n")
    with pytest.raises(InputError, match="config.json"):
        embed_fasta(fa, tmp_path / "nope")


# ---------------------------------------------------------------------------------- tables


def _table() -> GeneTable:
    return GeneTable(["TP53", "KRAS", "MYC"], np.arange(12, dtype=np.float32).reshape(3, 4) / 7)


def test_table_roundtrip_all_formats(tmp_path):
    from safetensors.torch import save_file

    t = _table()
    save_gene_table(t, tmp_path / "t.safetensors")
    got = load_gene_table(tmp_path / "t.safetensors")
    assert got.genes == t.genes and np.array_equal(got.vectors, t.vectors)

    torch.save(
        {g: torch.from_numpy(v.copy()) for g, v in zip(t.genes, t.vectors, strict=True)}, tmp_path / "t.pt"
    )
    got = load_gene_table(tmp_path / "t.pt")
    assert got.genes == t.genes and np.array_equal(got.vectors, t.vectors)

    save_file(
        {g: torch.from_numpy(v.copy()) for g, v in zip(t.genes, t.vectors, strict=True)},
        str(tmp_path / "per_gene.safetensors"),
    )
    got = load_gene_table(tmp_path / "per_gene.safetensors")
    assert sorted(got.genes) == sorted(t.genes)
    assert np.array_equal(got.vectors[got.genes.index("KRAS")], t.vectors[1])

    np.save(tmp_path / "t.npy", t.vectors)
    with pytest.raises(InputError, match="gene list"):
        load_gene_table(tmp_path / "t.npy")
    (tmp_path / "t.genes.txt").write_text("\n".join(t.genes) + "\n")
    got = load_gene_table(tmp_path / "t.npy")
    assert got.genes == t.genes and np.array_equal(got.vectors, t.vectors)

    rows = [",".join([g, *map(repr, map(float, v))]) for g, v in zip(t.genes, t.vectors, strict=True)]
    (tmp_path / "h.csv").write_text("gene,d0,d1,d2,d3\n" + "\n".join(rows) + "\n")
    (tmp_path / "n.csv").write_text("\n".join(rows) + "\n")
    for name in ("h.csv", "n.csv"):
        got = load_gene_table(tmp_path / name)
        assert got.genes == t.genes and np.array_equal(got.vectors, t.vectors)


def test_table_errors(tmp_path):
    with pytest.raises(InputError, match="duplicated"):
        GeneTable(["A", "A"], np.zeros((2, 3)))
    with pytest.raises(InputError, match="NaN"):
        GeneTable(["A"], np.array([[np.nan]]))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match="unknown gene table format"):
        load_gene_table(tmp_path / "x.json")
    (tmp_path / "ragged.csv").write_text("A,1,2\nB,1\n")
    with pytest.raises(InputError, match="different lengths"):
        load_gene_table(tmp_path / "ragged.csv")


# -------------------------------------------------------------------------------------- HGNC

_HGNC_HEADER = (
    "HGNC ID\tApproved symbol\tApproved name\tLocus group\tLocus type\tChromosome\tEnsembl gene ID\t"
    "NCBI gene ID\tAlias symbol\tPrevious symbol\n"
)
_HGNC = _HGNC_HEADER + """HGNC:1\tASIC1\tx\tg\tt\t12\tENSG00000110881\t41\tBNaC2|hBNaC2\tACCN2
HGNC:2\tTP53\tx\tg\tt\t17\tENSG00000141510\t7157\tLFS1|SHARED\t
HGNC:3\tKRAS\tx\tg\tt\t12\tENSG00000133703\t3845\tSHARED\tKRAS2
HGNC:4\tC1orf112\tx\tg\tt\t1\t\t\t\t
"""


@pytest.fixture()
def hgnc(tmp_path) -> HgncIndex:
    p = tmp_path / "hgnc.tsv"
    p.write_text(_HGNC)
    return HgncIndex.from_tsv(p)


def test_hgnc_resolution_priority(hgnc):
    assert hgnc.resolve("ASIC1") == ("ASIC1", "approved")
    assert hgnc.resolve("c1orf112") == ("C1orf112", "approved_ci")  # case-insensitive
    assert hgnc.resolve("ENSG00000141510.17") == ("TP53", "ensembl")  # version ignored
    assert hgnc.resolve("ACCN2") == ("ASIC1", "previous")
    assert hgnc.resolve("hBNaC2") == ("ASIC1", "alias")
    assert hgnc.resolve("SHARED") == (None, "ambiguous")  # alias of TP53 and KRAS
    assert hgnc.resolve("NOPE") == (None, "unmapped")


def test_hgnc_missing_column(tmp_path):
    p = tmp_path / "h.tsv"
    p.write_text("Approved symbol\tfoo\nA\tb\n")
    with pytest.raises(InputError, match="lacks column"):
        HgncIndex.from_tsv(p)


def test_align_gene_table_exact_mapped_missing(hgnc):
    table = GeneTable(["TP53", "ACCN2", "KRAS2", "KRAS"], np.arange(8, dtype=np.float32).reshape(4, 2))
    genes = ["TP53", "ASIC1", "KRAS", "ENSG00000110881", "LFS1", "UNKNOWN1", "SHARED"]
    vec, found, cov = align_gene_table(table, genes, hgnc)
    assert found.tolist() == [True, True, True, True, True, False, False]
    np.testing.assert_array_equal(vec[0], [0, 1])  # TP53 exact
    np.testing.assert_array_equal(vec[1], [2, 3])  # ASIC1 <- table's previous symbol ACCN2
    np.testing.assert_array_equal(vec[2], [6, 7])  # KRAS exact (not KRAS2)
    np.testing.assert_array_equal(vec[3], [2, 3])  # Ensembl id -> ASIC1 -> ACCN2 row
    np.testing.assert_array_equal(vec[4], [0, 1])  # alias LFS1 -> TP53
    assert cov.exact == 2 and cov.mapped == {"ASIC1": "ACCN2", "ENSG00000110881": "ACCN2", "LFS1": "TP53"}
    assert cov.missing == ["UNKNOWN1", "SHARED"]
    assert "5/7 genes" in cov.summary() and "UNKNOWN1" in cov.summary()
    json.dumps(cov.to_dict())
    # without HGNC only exact names match
    _, found, cov = align_gene_table(table, genes)
    assert found.tolist() == [True, False, True, False, False, False, False] and cov.found == 2


@pytest.mark.shared
def test_real_hgnc_table_maps_known_genes():
    path = SHARED / "annotation" / "hgnc_genes.tsv"
    if not path.is_file():
        pytest.skip("../shared/data absent")
    idx = HgncIndex.from_tsv(path)
    assert len(idx.table.symbols) > 40_000
    assert idx.resolve("ACCN2") == ("ASIC1", "previous")
    assert idx.resolve("ENSG00000110881") == ("ASIC1", "ensembl")
    assert idx.resolve("tp53")[0] == "TP53"
