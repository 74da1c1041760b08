"""``celltwin prep`` of a file: streamed in row blocks, same content as the in-memory prep.

A file with a CSR or dense X is read lazily (``H5adSource``) in row blocks, twice. A small minimal
matrix is assembled in memory and written by anndata (the inner h5ad byte-identical to the
in-memory path's, hence to cell-eval's); a large one (``PREP_IN_MEMORY_MAX_BYTES``, set to 0 here)
is written block by block: same X data / indices / indptr (dtypes and chunking included), obs,
var and uns as anndata reads them.
"""

from __future__ import annotations

import tarfile

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zstandard

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.data.source import H5adSource
from celltwin.errors import InputError
from celltwin.eval import _baseline, _prep, _prep_stream

pytestmark = [pytest.mark.filterwarnings("ignore:Some cells have zero counts")]

N_CELLS, N_GENES = 61, 13


def _inner_h5ad(vcc_path, dest) -> bytes:
    with tarfile.open(vcc_path) as tar:
        assert tar.getnames() == ["pred.h5ad.zst", "watermark.txt"]
        raw = tar.extractfile("pred.h5ad.zst").read()
        assert tar.extractfile("watermark.txt").read() == _prep.WATERMARK
    data = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    dest.write_bytes(data)
    return data


def _make(kind: str, fmt: str, seed: int = 0) -> ad.AnnData:
    """Cells x genes prediction: ``kind`` counts / log / bigcounts, ``fmt`` csr / dense / dense-int."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.6, 2.0, size=N_GENES), size=(N_CELLS, N_GENES)).astype(np.float64)
    X[5] = 0  # a cell with no counts
    X[17, :] = 0
    if kind == "log":
        X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    elif kind == "bigcounts":  # allow_discrete keeps fractional values >= 15 too
        X = X * 7.25
    labels = np.array([CONTROL_LABEL, "A", "B", "C"])[rng.integers(0, 4, N_CELLS)]
    labels[0] = CONTROL_LABEL
    obs = pd.DataFrame(
        {
            PERT_COL: labels,
            "celltype": rng.choice(["k562", "hepg2"], N_CELLS),
            "cat_ct": pd.Categorical(rng.choice(["x", "y", "z"], N_CELLS)),
            "other": rng.normal(size=N_CELLS),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])
    if fmt == "csr":
        M = sp.csr_matrix(X.astype(np.float32))
        # explicit stored zeros and unsorted column indices within rows are kept as they are
        M = sp.csr_matrix((M.data, M.indices, M.indptr), shape=M.shape)
        M.data[::11] = 0.0
        for r in (2, 9, 40):
            a, b = M.indptr[r], M.indptr[r + 1]
            M.indices[a:b] = M.indices[a:b][::-1].copy()
            M.data[a:b] = M.data[a:b][::-1].copy()
        return ad.AnnData(X=M, obs=obs, var=var)
    if fmt == "dense-int":
        return ad.AnnData(X=X.astype(np.int64), obs=obs, var=var)
    return ad.AnnData(X=X, obs=obs, var=var)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 7 rows and 40 values: many blocks, some cut by rows, some by values."""
    monkeypatch.setattr(_prep_stream, "PREP_BLOCK_ROWS", 7)
    monkeypatch.setattr(_prep_stream, "PREP_BLOCK_VALUES", 40)


def _h5_arrays(path) -> dict:
    with h5py.File(path, "r") as f:
        g = f["X"]
        out = {k: g[k][:] for k in ("data", "indices", "indptr")}
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in g.attrs.items()}
        out["chunks"] = {k: g[k].chunks for k in ("data", "indices", "indptr")}
        out["maxshape"] = {k: g[k].maxshape for k in ("data", "indices", "indptr")}
        out["keys"] = sorted(f.keys())
        out["root"] = dict(f.attrs)
    return out


def _assert_same_content(streamed, ref) -> None:
    s, r = _h5_arrays(streamed), _h5_arrays(ref)
    for k in ("data", "indices", "indptr"):
        assert s[k].dtype == r[k].dtype, k
        assert s[k].tobytes() == r[k].tobytes(), k  # bitwise
    for k in ("attrs", "chunks", "maxshape", "keys", "root"):
        assert s[k] == r[k], k
    a, b = ad.read_h5ad(streamed), ad.read_h5ad(ref)
    assert a.X.dtype == b.X.dtype and a.X.shape == b.X.shape
    assert np.array_equal(a.X.indptr, b.X.indptr) and np.array_equal(a.X.indices, b.X.indices)
    assert a.X.data.tobytes() == b.X.data.tobytes()
    assert a.obs.equals(b.obs) and a.obs.dtypes.equals(b.obs.dtypes)
    for col in a.obs.columns:
        if isinstance(b.obs[col].dtype, pd.CategoricalDtype):
            assert list(a.obs[col].cat.categories) == list(b.obs[col].cat.categories)
    assert list(a.obs_names) == [str(i) for i in range(a.n_obs)] == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names) and a.var.equals(b.var)
    assert a.uns.keys() == b.uns.keys() and a.uns.get("log1p") == b.uns.get("log1p")
    # a backed read (anndata's lazy sparse dataset) sees the same matrix
    with h5py.File(streamed, "r") as f:
        lazy = ad.io.sparse_dataset(f["X"])
        assert (lazy[5:30] != b.X[5:30]).nnz == 0


CASES = [
    # (kind, fmt, prep kwargs, reorder genes)
    ("counts", "csr", {}, False),
    ("counts", "csr", {"encoding": 64, "celltype_col": "celltype"}, True),
    ("counts", "dense", {"celltype_col": "cat_ct", "output_pert_col": "pert"}, True),
    ("counts", "dense-int", {"encoding": 64}, False),
    ("log", "csr", {"celltype_col": "celltype"}, True),
    ("log", "dense", {"encoding": 64}, False),
    ("log", "dense", {}, True),
    ("counts", "csr", {"allow_discrete": True}, True),
    ("bigcounts", "dense", {"allow_discrete": True, "encoding": 64}, False),
]


@pytest.mark.parametrize(("kind", "fmt", "kwargs", "reorder"), CASES)
def test_streamed_prep_equals_in_memory_prep(tmp_path, monkeypatch, small_blocks, kind, fmt, kwargs, reorder):
    a = _make(kind, fmt)
    path = tmp_path / "pred.h5ad"
    a.write_h5ad(path)
    genes = list(a.var_names)[::-1] if reorder else list(a.var_names)
    kw = {"expected_gene_dim": None, **kwargs}
    # reference: today's path, the whole file read by anndata and prepared in memory
    ref = _prep.prep_vcc(ad.read_h5ad(path), genes, tmp_path / "ref.vcc", **kw)
    ref_bytes = _inner_h5ad(tmp_path / "ref.vcc", tmp_path / "ref.h5ad")
    # file, small: streamed reads, assembled in memory -> the same bytes
    small = _prep.prep_vcc(path, genes, tmp_path / "small.vcc", **kw)
    assert _inner_h5ad(tmp_path / "small.vcc", tmp_path / "small.h5ad") == ref_bytes
    # file, large (threshold 0): streamed writer -> the same content
    monkeypatch.setattr(_prep_stream, "PREP_IN_MEMORY_MAX_BYTES", 0)
    big = _prep.prep_vcc(path, genes, tmp_path / "big.vcc", **kw)
    _inner_h5ad(tmp_path / "big.vcc", tmp_path / "big.h5ad")
    _assert_same_content(tmp_path / "big.h5ad", tmp_path / "ref.h5ad")
    for res in (small, big):
        assert (res.n_cells, res.n_genes, res.reordered_genes, res.normalized, res.warnings) == (
            ref.n_cells,
            ref.n_genes,
            ref.reordered_genes,
            ref.normalized,
            ref.warnings,
        )
    assert ref.normalized == (kind == "counts" and not kwargs.get("allow_discrete"))
    assert ref.reordered_genes == reorder


def test_streamed_prep_reads_row_blocks_only(tmp_path, monkeypatch):
    """No read covers all the cells: every read is one row block (twice over the file)."""
    a = _make("counts", "csr")
    path = tmp_path / "pred.h5ad"
    a.write_h5ad(path)
    monkeypatch.setattr(_prep_stream, "PREP_BLOCK_ROWS", 16)
    seen: list[np.ndarray] = []
    orig = H5adSource.read_stored

    def spy(self, uniq):
        seen.append(np.asarray(uniq).copy())
        return orig(self, uniq)

    monkeypatch.setattr(H5adSource, "read_stored", spy)
    for threshold in (_prep_stream.PREP_IN_MEMORY_MAX_BYTES, 0):
        monkeypatch.setattr(_prep_stream, "PREP_IN_MEMORY_MAX_BYTES", threshold)
        seen.clear()
        _prep.prep_vcc(path, list(a.var_names), tmp_path / f"o{threshold}.vcc", expected_gene_dim=None)
        n_blocks = -(-N_CELLS // 16)
        assert len(seen) == 2 * n_blocks  # first pass (checks, totals) and second pass (write)
        assert max(s.size for s in seen) <= 16 < N_CELLS
        assert np.array_equal(np.concatenate(seen[:n_blocks]), np.arange(N_CELLS))
        assert np.array_equal(np.concatenate(seen[n_blocks:]), np.arange(N_CELLS))


def test_block_bounds_cover_rows_by_rows_and_values(monkeypatch):
    monkeypatch.setattr(_prep_stream, "PREP_BLOCK_ROWS", 4)
    monkeypatch.setattr(_prep_stream, "PREP_BLOCK_VALUES", 10)

    class Fake:
        n_obs, n_vars = 9, 3

        def __init__(self, nnz):
            self.nnz = nnz

        def row_nnz(self):
            return self.nnz

    # a row over the value budget is a block on its own; otherwise the budget or 4 rows cut
    assert _prep_stream._block_bounds(Fake(np.array([1, 1, 1, 1, 1, 12, 5, 5, 1]))) == [
        (0, 4),
        (4, 5),
        (5, 6),
        (6, 8),
        (8, 9),
    ]
    assert _prep_stream._block_bounds(Fake(None)) == [(0, 3), (3, 6), (6, 9)]  # dense: 10 // 3 rows


def _with_inf(a: ad.AnnData) -> None:
    a.X = a.X.astype(np.float32)
    a.X[3, 1] = np.inf


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (
            lambda a: setattr(a, "X", a.X - 2),
            {},
            r"^(\S*pred.h5ad|prediction): X contains negative values .*min is -2",
        ),
        (
            lambda a: setattr(a, "X", a.X - 2),
            {"allow_discrete": True},
            r"X contains negative values .*min is -2",
        ),
        (_with_inf, {}, r"X contains 1 non-finite value"),
        (lambda a: setattr(a, "X", a.X * 10.5), {}, r"X mixes counts and log values .*max is"),
        (lambda a: a.obs.drop(columns=[PERT_COL], inplace=True), {}, r"obs\['target_gene'\] is missing"),
        (lambda a: None, {"celltype_col": "nope"}, r"cell type column obs\['nope'\]"),
        (lambda a: None, {"max_cell_dim": 10}, "61 cells exceed the maximum of 10"),
        (lambda a: None, {"genes": ["g0", "g1"]}, r"0 missing .* 11 not in the list"),
    ],
)
@pytest.mark.parametrize("fmt", ["csr", "dense-int"])
def test_file_prep_refuses_like_in_memory_prep(tmp_path, small_blocks, fmt, mutate, kwargs, match):
    a = _make("counts", fmt)
    if fmt == "csr":
        a.X = a.X.toarray()
    mutate(a)
    if fmt == "csr":
        a.X = sp.csr_matrix(a.X)
    d = tmp_path / "in"
    d.mkdir()
    a.write_h5ad(d / "pred.h5ad")
    kwargs = dict(kwargs)  # the parametrized dict is shared by the fmt cases
    genes = kwargs.pop("genes", list(a.var_names))
    out = tmp_path / "out"
    out.mkdir()
    for data in (d / "pred.h5ad", ad.read_h5ad(d / "pred.h5ad")):
        with pytest.raises(InputError, match=match):
            _prep.prep_vcc(data, genes, out / "x.vcc", expected_gene_dim=None, **kwargs)
        assert list(out.iterdir()) == []


def test_csc_file_is_prepared_in_memory(tmp_path):
    a = _make("counts", "csr")
    a.X = sp.csc_matrix(a.X)
    path = tmp_path / "pred.h5ad"
    a.write_h5ad(path)
    genes = list(a.var_names)[::-1]
    _prep.prep_vcc(path, genes, tmp_path / "f.vcc", expected_gene_dim=None)
    _prep.prep_vcc(ad.read_h5ad(path), genes, tmp_path / "m.vcc", expected_gene_dim=None)
    assert _inner_h5ad(tmp_path / "f.vcc", tmp_path / "f.h5ad") == _inner_h5ad(
        tmp_path / "m.vcc", tmp_path / "m.h5ad"
    )


def test_baseline_refuses_negative_integer_counts():
    a = _make("counts", "dense-int")
    a.X[4, 2] = -1
    with pytest.raises(InputError, match=r"^train.h5ad: X contains negative values .*min is -1"):
        _baseline.cell_mean_baseline(a, source="train.h5ad")
    with pytest.raises(InputError, match=r"X contains negative values"):
        _baseline.cell_mean_baseline(a, allow_discrete=True)
