"""``celltwin prep --format vcc2026``: the 2026 upload file, checked against vcc-cli 0.3.0's ``vcc prep``.

The reference runs in-process (``vcc.cli`` through click's runner) on the same inputs (tests marked
``reference``; skipped when vcc-cli is not installed). The archive
is compared byte for byte (with ``cli_version="0.3.0"``, the one field naming the writer), then
member by member with celltwin's own ``cli_version``: tar member names and order, ``meta.json``,
the compressed and the decompressed ``pred.h5ad`` (bytes, then X data / indices / indptr, obs,
var as anndata reads them). Every refusal of vcc is refused here too, with one line naming the
file and the field, and nothing is written.
"""

from __future__ import annotations

import io
import json
import tarfile

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zstandard

from celltwin.errors import ConfigError, InputError
from celltwin.eval import _prep2026 as p26

GENES = [f"G{i:02d}" for i in range(30)]
PERTS = ["ADNP", "BRCA1", "CTCF"]
CTXS = ("A", "B", "C")
N = 4  # cells per perturbation and context


# ---------------------------------------------------------------------------------------- inputs
def _bundle(tmp_path, *, n_cells: bool = False, per_context: bool = False, manifest: dict | None = None):
    """gene_names.csv (with its header), pert_counts.csv (with the control row), manifest.json."""
    d = tmp_path / "bundle"
    d.mkdir(exist_ok=True)
    pd.DataFrame({"gene_name": GENES}).to_csv(d / "gene_names.csv", index=False)
    if per_context:
        rows = [{"target_gene": p, "context": c} for c in CTXS for p in [*PERTS, "non-targeting"]]
    else:
        rows = [{"target_gene": p} for p in [*PERTS, "non-targeting"]]
    frame = pd.DataFrame(rows)
    if n_cells:
        frame["n_cells"] = N
    frame.to_csv(d / "pert_counts.csv", index=False)
    if manifest is not None:
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d / "gene_names.csv", d / "pert_counts.csv"


def _pred(seed: int = 0, *, n: int = N) -> ad.AnnData:
    """A valid prediction: raw counts, N cells of each perturbation in each context, no controls."""
    rng = np.random.default_rng(seed)
    lab = [(c, p) for c in CTXS for p in PERTS for _ in range(n)]
    X = rng.poisson(1.3, size=(len(lab), len(GENES))).astype(np.float32)
    X[:, 0] += 1  # every cell has counts
    obs = pd.DataFrame({"target_gene": [p for _, p in lab], "context": [c for c, _ in lab],
                        "celltype": rng.choice(["k562", "hepg2"], len(lab))},
                       index=[f"cell{i}" for i in range(len(lab))])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=GENES))


def _non_canonical_csr(X: np.ndarray, rng) -> sp.csr_matrix:
    """``X`` as CSR with unsorted column indices, duplicated entries (summing to X) and explicit zeros."""
    C = sp.coo_matrix(X)
    r, c, v = C.row, C.col, C.data.astype(np.float32)
    half = v.copy()
    split = v >= 2
    half[split] = np.floor(v[split] / 2)
    rest = v[split] - half[split]
    zr, zc = rng.integers(0, X.shape[0], 6), rng.integers(0, X.shape[1], 6)
    keep = X[zr, zc] == 0
    r = np.concatenate([r, r[split], zr[keep]])
    c = np.concatenate([c, c[split], zc[keep]])
    v = np.concatenate([half, rest, np.zeros(int(keep.sum()), np.float32)])
    order = rng.permutation(r.size)
    r, c, v = r[order], c[order], v[order]
    srt = np.argsort(r, kind="stable")
    r, c, v = r[srt], c[srt], v[srt]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=X.shape[0]))]).astype(np.int64)
    return sp.csr_matrix((v, c.astype(np.int64), indptr), shape=X.shape)


def _case(name: str, seed: int = 0) -> tuple[ad.AnnData, dict]:
    """``(prediction, options)`` of a comparison case; options: ``vcc`` extra args, ``ours`` kwargs."""
    a = _pred(seed)
    rng = np.random.default_rng(seed + 100)
    X = a.X.toarray()
    opts: dict = {"vcc": [], "ours": {}}
    if name == "categorical_celltype":
        for col in ("target_gene", "context", "celltype"):
            a.obs[col] = pd.Categorical(a.obs[col])
        opts = {"vcc": ["-c", "celltype"], "ours": {"celltype_col": "celltype"}}
    elif name == "reordered_non_canonical":
        perm = rng.permutation(len(GENES))
        a = ad.AnnData(X=_non_canonical_csr(X[:, perm], rng), obs=a.obs,
                       var=pd.DataFrame(index=[GENES[i] for i in perm]))
    elif name == "dense_float64":
        a.X = X.astype(np.float64)
    elif name == "dense_int_reordered":
        perm = rng.permutation(len(GENES))
        a = ad.AnnData(X=X[:, perm].astype(np.int32), obs=a.obs, var=pd.DataFrame(index=[GENES[i] for i in perm]))
    elif name == "csc":
        a.X = sp.csc_matrix(X)
    elif name == "encoding64":
        opts = {"vcc": ["-e", "64"], "ours": {"encoding": 64}}
    elif name == "other_names":
        a.obs = a.obs.rename(columns={"target_gene": "gene", "context": "cell_context"})
        opts = {"vcc": ["-p", "gene", "--context-col", "cell_context", "-P", "perturbation"],
                "ours": {"pert_col": "gene", "context_col": "cell_context", "output_pert_col": "perturbation"}}
    return a, opts


def _vcc(args) -> tuple[int, str]:
    """``vcc prep ARGS`` of vcc-cli (the reference), in-process: ``(exit code, output)``."""
    vcc_cli = pytest.importorskip("vcc.cli", reason="vcc-cli (the reference) is not installed")
    from click.testing import CliRunner  # click comes with vcc-cli

    res = CliRunner().invoke(vcc_cli.cli, ["prep", *map(str, args)])
    return res.exit_code, res.output


def _vcc_prep(inp, genes, perts, out, extra=(), contexts="A,B,C", cells=N) -> None:
    args = [inp, "-g", genes, "--perts", perts, "-o", out, "--cells-per-pert", cells, "-f", *extra]
    if contexts is not None:
        args += ["--contexts", contexts]
    code, text = _vcc(args)
    assert code == 0, text


def _members(path) -> list[tuple[str, bytes, tarfile.TarInfo]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read(), m) for m in tar.getmembers()]


def _h5ad(zst: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(zst)


def _read(h5: bytes) -> ad.AnnData:
    return ad.read_h5ad(io.BytesIO(h5))


# ---------------------------------------------------------------------------- same archive as vcc
CASES = ["csr", "categorical_celltype", "reordered_non_canonical", "dense_float64", "dense_int_reordered", "csc",
         "encoding64", "other_names"]


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES)
def test_archive_matches_vcc_prep(tmp_path, monkeypatch, case):
    genes, perts = _bundle(tmp_path)
    a, opts = _case(case)
    a.write_h5ad(tmp_path / "pred.h5ad")
    if case == "reordered_non_canonical":  # the file really holds unsorted and duplicated indices
        with h5py.File(tmp_path / "pred.h5ad") as f:
            ind, ptr = f["X/indices"][:], f["X/indptr"][:]
        row0 = ind[ptr[0]:ptr[1]]
        assert np.any(np.diff(row0) <= 0)
    _vcc_prep(tmp_path / "pred.h5ad", genes, perts, tmp_path / "vcc.vcc", opts["vcc"])
    monkeypatch.setattr(p26, "BLOCK_ROWS", 5)  # several row blocks
    res = p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "same.vcc", perts=perts, contexts="A,B,C",
                           cells_per_pert=N, cli_version=p26.VCC_CLI_VERSION, **opts["ours"])
    theirs = (tmp_path / "vcc.vcc").read_bytes()
    assert (tmp_path / "same.vcc").read_bytes() == theirs  # the whole archive, byte for byte
    assert res.meta["nnz"] == json.loads(_members(tmp_path / "vcc.vcc")[0][1])["nnz"]

    # celltwin's own cli_version: everything else identical
    p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "ours.vcc", perts=perts, contexts="A,B,C",
                     cells_per_pert=N, **opts["ours"])
    ours, ref = _members(tmp_path / "ours.vcc"), _members(tmp_path / "vcc.vcc")
    assert [m[0] for m in ours] == [m[0] for m in ref] == ["meta.json", "pred.h5ad.zst"]
    for (_, _, mo), (_, _, mr) in zip(ours, ref, strict=True):
        assert (mo.mode, mo.uid, mo.gid, mo.uname, mo.gname, mo.mtime, mo.type) == \
               (mr.mode, mr.uid, mr.gid, mr.uname, mr.gname, mr.mtime, mr.type) == (0o644, 0, 0, "", "", 0, b"0")
    meta_o, meta_r = json.loads(ours[0][1]), json.loads(ref[0][1])
    assert meta_r["cli_version"] == "0.3.0" and meta_o["cli_version"] == p26.celltwin_cli_version()
    assert meta_o["cli_version"].startswith("0.3.0+celltwin.")
    assert {k: v for k, v in meta_o.items() if k != "cli_version"} == \
           {k: v for k, v in meta_r.items() if k != "cli_version"}
    assert ours[1][1] == ref[1][1]  # pred.h5ad.zst, compressed bytes
    h5o, h5r = _h5ad(ours[1][1]), _h5ad(ref[1][1])
    assert h5o == h5r  # the h5ad itself
    bo, br = _read(h5o), _read(h5r)
    assert type(bo.X) is type(br.X) and bo.X.dtype == br.X.dtype
    for attr in ("data", "indices", "indptr"):
        x, y = getattr(bo.X, attr), getattr(br.X, attr)
        assert x.dtype == y.dtype and np.array_equal(x, y)
    pd.testing.assert_frame_equal(bo.obs, br.obs)
    pd.testing.assert_frame_equal(bo.var, br.var)
    # and the content is the prediction's, in the gene list's order
    want = a[:, GENES].X
    want = want.toarray() if sp.issparse(want) else np.asarray(want)
    np.testing.assert_array_equal(bo.X.toarray(), want)
    assert list(bo.var_names) == GENES and list(bo.obs_names) == [str(i) for i in range(a.n_obs)]


@pytest.mark.reference
def test_in_memory_anndata_and_bundle_manifest(tmp_path):
    """An AnnData given in memory, contexts and panel_id from the bundle's manifest.json, per-context
    pert_counts.csv with an n_cells column: the same bytes as vcc on the file."""
    genes, perts = _bundle(tmp_path, n_cells=True, per_context=True,
                           manifest={"contexts": list(CTXS), "panel_id": "vcc2026-validation", "partition": "val"})
    a = _pred(3)
    a.write_h5ad(tmp_path / "pred.h5ad")
    _vcc_prep(tmp_path / "pred.h5ad", genes, perts, tmp_path / "vcc.vcc", contexts=None, cells=400)
    res = p26.prep_vcc2026(a, genes, tmp_path / "ours.vcc", perts=perts, cli_version="0.3.0")
    assert (tmp_path / "ours.vcc").read_bytes() == (tmp_path / "vcc.vcc").read_bytes()
    assert res.meta["panel_id"] == "vcc2026-validation" and res.meta["contexts"] == list(CTXS)
    assert res.cells_per_context == {"A": 12, "B": 12, "C": 12} and res.verified_targets


def test_int64_indices_past_int32(tmp_path, monkeypatch):
    """Past 2**31 stored entries scipy (hence vcc) indexes with int64: the raw int32 indices are widened
    on disk first (scipy would otherwise copy them into memory); the content is unchanged."""
    genes, perts = _bundle(tmp_path)
    _pred(4).write_h5ad(tmp_path / "pred.h5ad")
    monkeypatch.setattr(p26, "_INT32_MAX", 50)  # "past int32" for this small matrix
    calls = []
    widen = p26._widen
    monkeypatch.setattr(p26, "_widen", lambda path, n: calls.append(n) or widen(path, n))
    p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "ours.vcc", perts=perts, contexts="A,B,C",
                     cells_per_pert=N)
    assert calls == [_pred(4).X.nnz]
    back = _read(_h5ad(_members(tmp_path / "ours.vcc")[1][1]))
    np.testing.assert_array_equal(back.X.toarray(), _pred(4).X.toarray())


def test_deterministic_and_dry_run(tmp_path):
    genes, perts = _bundle(tmp_path)
    _pred(5).write_h5ad(tmp_path / "pred.h5ad")
    kw = {"perts": perts, "contexts": "A,B,C", "cells_per_pert": N}
    p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "1.vcc", **kw)
    p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "2.vcc", **kw)
    assert (tmp_path / "1.vcc").read_bytes() == (tmp_path / "2.vcc").read_bytes()
    res = p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, None, dry_run=True, **kw)
    assert res.path is None and res.meta is None and res.nnz == _pred(5).X.nnz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.vcc", "2.vcc", "bundle", "pred.h5ad"]


def test_cli(tmp_path, capsys):
    from celltwin import cli

    genes, perts = _bundle(tmp_path)
    _pred(6).write_h5ad(tmp_path / "pred.h5ad")
    base = ["prep", "--format", "vcc2026", "-i", str(tmp_path / "pred.h5ad"), "-g", str(genes), "--perts", str(perts),
            "--contexts", "A,B,C", "--cells-per-pert", str(N)]
    assert cli.main(base) == 0  # default output: <input>.prep.vcc
    out = capsys.readouterr()
    assert "wrote" in out.out and "contexts A=12, B=12, C=12" in out.out
    assert "18533" in out.err  # the gene-count warning, as vcc's note
    p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "api.vcc", perts=perts, contexts="A,B,C",
                     cells_per_pert=N)
    assert (tmp_path / "pred.prep.vcc").read_bytes() == (tmp_path / "api.vcc").read_bytes()
    # a refusal: exit 2, one line, nothing written
    assert cli.main([*base[:-1], "5", "-o", str(tmp_path / "bad.vcc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("celltwin prep: error: ") and "wrong number of cells" in err[0]
    assert not (tmp_path / "bad.vcc").exists()
    # vcc2026-only flags are refused with the 2025 format; --allow-discrete with 2026
    assert cli.main(["prep", "-i", str(tmp_path / "pred.h5ad"), "-g", str(genes), "--perts", str(perts)]) == 2
    assert "--perts: only with --format vcc2026" in capsys.readouterr().err
    assert cli.main([*base, "--allow-discrete"]) == 2
    # --dry-run writes nothing
    assert cli.main([*base, "-o", str(tmp_path / "dry.vcc"), "--dry-run"]) == 0
    assert not (tmp_path / "dry.vcc").exists()


# --------------------------------------------------------------------------------- refusals
def _set(a: ad.AnnData, row, col, value) -> ad.AnnData:
    X = a.X.toarray().astype(np.float32)
    X[row, col] = value
    a.X = sp.csr_matrix(X)
    return a


def _drop_cells(a, mask):
    return a[~mask].copy()


REFUSALS = [
    # (id, make(a) -> a, vcc args, our kwargs, message)
    ("controls", lambda a: _relabel(a, 0, "non-targeting"), [], {}, r"'non-targeting' control cells; expected none"),
    ("no_context_column", lambda a: _del_col(a, "context"), [], {}, r"context column obs\['context'\] is missing"),
    ("unknown_context", lambda a: _set_col(a, "context", 0, "D"), [], {}, r"unknown context\(s\) D"),
    ("missing_context", lambda a: _drop_cells(a, (a.obs["context"] == "C").to_numpy()), [], {},
     r"no cells of context\(s\) C"),
    ("extra_perturbation", lambda a: _relabel_pert(a, "CTCF", "ZNF1"), [], {},
     r"context A: obs\['target_gene'\] does not match .*missing \(CTCF\).*not in the list \(ZNF1\)"),
    ("construct_id", lambda a: _relabel_pert(a, "ADNP", "ADNP-1"), [], {}, r"construct ids"),
    ("wrong_cell_count", lambda a: _drop_cells(a, np.arange(a.n_obs) == N + 1), [], {},
     r"context A: 1 perturbation\(s\) .* wrong number of cells \(BRCA1 has 3\); expected exactly 4"),
    ("missing_gene", lambda a: a[:, GENES[1:]].copy(), [], {}, r"var_names do not match .*1 missing \(G00\)"),
    ("extra_gene", lambda a: _add_gene(a), [], {}, r"1 not in the list \(EXTRA\)"),
    ("duplicated_var_names", lambda a: _dup_var(a), [], {}, r"var_names have duplicated gene names \(G01\)"),
    ("negative", lambda a: _set(a, 3, 2, -1.0), [], {}, r"negative values \(first in row 3\)"),
    ("fractional", lambda a: _set(a, 5, 2, 1.5), [], {}, r"fractional values .*1\.5 in row 5"),
    ("nan", lambda a: _set(a, 7, 1, np.nan), [], {}, r"1 non-finite value\(s\) \(1 NaN, 0 inf\) .*rows 7"),
    ("inf", lambda a: _set(a, 8, 1, np.inf), [], {}, r"\(0 NaN, 1 inf\)"),
    ("cell_total_over_cap", lambda a: _set(a, 9, 4, 2e6), [], {}, r"total more than 1,000,000 counts \(worst: row 9"),
    ("cell_total_over_flag", lambda a: a, ["--max-counts-per-cell", "20"], {"max_counts_per_cell": 20},
     r"total more than 20 counts"),
    ("all_zero_perturbation", lambda a: _zero_pert(a, "BRCA1"), [], {}, r"all-zero predictions .*\(BRCA1\)"),
    ("too_many_entries", lambda a: a, ["--max-nnz", "100"], {"max_nnz": 100}, r"X stores \d+ entries"),
    ("too_many_cells", lambda a: a, ["--max-cell-dim", "10"], {"max_cell_dim": 10}, r"36 cells; expected at most 10"),
    ("no_cells", lambda a: a[:0].copy(), [], {}, r"0 cells"),
    ("no_pert_column", lambda a: _del_col(a, "target_gene"), [], {}, r"perturbation column obs\['target_gene'\]"),
    ("corrupt_indptr", lambda a: a, [], {}, r"X \(CSR\) is corrupted: indptr decreases"),
]


def _relabel(a, row, label):
    a.obs["target_gene"] = a.obs["target_gene"].astype(str)
    a.obs.iloc[row, a.obs.columns.get_loc("target_gene")] = label
    return a


def _relabel_pert(a, old, new):
    a.obs["target_gene"] = a.obs["target_gene"].astype(str).replace(old, new)
    return a


def _set_col(a, col, row, value):
    a.obs.iloc[row, a.obs.columns.get_loc(col)] = value
    return a


def _del_col(a, col):
    del a.obs[col]
    return a


def _add_gene(a):
    return ad.AnnData(X=sp.hstack([a.X, sp.csr_matrix(np.ones((a.n_obs, 1), np.float32))]).tocsr(), obs=a.obs,
                      var=pd.DataFrame(index=[*GENES, "EXTRA"]))


def _dup_var(a):
    a.var_names = [GENES[0], GENES[1], GENES[1], *GENES[3:]]
    return a


def _zero_pert(a, pert):
    X = a.X.toarray()
    X[(a.obs["target_gene"] == pert).to_numpy()] = 0
    a.X = sp.csr_matrix(X)
    return a


def _corrupt(path):
    with h5py.File(path, "r+") as f:
        ptr = f["X/indptr"][:]
        ptr[3], ptr[4] = ptr[4], ptr[3]
        f["X/indptr"][:] = ptr


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("make", "vcc_args", "ours", "match"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused_like_vcc(tmp_path, make, vcc_args, ours, match):
    genes, perts = _bundle(tmp_path)
    a = make(_pred(7))
    a.write_h5ad(tmp_path / "pred.h5ad")
    if "corrupted" in match:
        _corrupt(tmp_path / "pred.h5ad")
    code, text = _vcc([tmp_path / "pred.h5ad", "-g", genes, "--perts", perts, "--contexts", "A,B,C",
                       "--cells-per-pert", N, "-o", tmp_path / "vcc.vcc", *vcc_args])
    assert code != 0, f"vcc prep accepted it: {text}"
    assert not (tmp_path / "vcc.vcc").exists()
    out = tmp_path / "ours.vcc"
    out.write_bytes(b"an older file")  # a refusal leaves an existing output as it was
    with pytest.raises(InputError, match=match) as e:
        p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, out, perts=perts, contexts="A,B,C", cells_per_pert=N, **ours)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "pred.h5ad") in msg  # one line, naming the file
    assert out.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "ours.vcc", "pred.h5ad"]  # no temporaries


@pytest.mark.reference
def test_reference_file_refusals(tmp_path):
    genes, perts = _bundle(tmp_path)
    _pred(8).write_h5ad(tmp_path / "pred.h5ad")
    base = [tmp_path / "pred.h5ad", "--cells-per-pert", N, "-o", tmp_path / "vcc.vcc"]
    kw = {"cells_per_pert": N}
    # a duplicated gene in the gene list
    dup = tmp_path / "dup.csv"
    dup.write_text("gene_name\n" + "\n".join([*GENES, GENES[3]]) + "\n")
    assert _vcc([*base, "-g", dup, "--perts", perts, "--contexts", "A,B,C"])[0] != 0
    with pytest.raises(InputError, match=r"dup\.csv: the gene list has 1 duplicated gene name\(s\) \(G03\)"):
        p26.prep_vcc2026(tmp_path / "pred.h5ad", dup, tmp_path / "o.vcc", perts=perts, contexts="A,B,C", **kw)
    # no perturbation list while checking it
    assert _vcc([*base, "-g", genes, "--contexts", "A,B,C"])[0] != 0
    with pytest.raises(ConfigError, match=r"--perts .* is needed"):
        p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "o.vcc", contexts="A,B,C", **kw)
    # contexts neither given nor in a manifest.json beside the bundle files
    assert _vcc([*base, "-g", genes, "--perts", perts])[0] != 0
    with pytest.raises(ConfigError, match=r"cannot tell which contexts"):
        p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "o.vcc", perts=perts, **kw)
    # a per-context list without this context
    only_ab = tmp_path / "ab.csv"
    pd.DataFrame([{"target_gene": p, "context": c} for c in "AB" for p in PERTS]).to_csv(only_ab, index=False)
    assert _vcc([*base, "-g", genes, "--perts", only_ab, "--contexts", "A,B,C"])[0] != 0
    with pytest.raises(InputError, match=r"ab\.csv: the perturbation list has no rows for context 'C'"):
        p26.prep_vcc2026(tmp_path / "pred.h5ad", genes, tmp_path / "o.vcc", perts=only_ab, contexts="A,B,C", **kw)
    assert not (tmp_path / "o.vcc").exists() and not (tmp_path / "vcc.vcc").exists()


@pytest.mark.reference
def test_accepted_like_vcc(tmp_path):
    """What vcc lets through passes here too: a cell totalling exactly the cap, --no-verify-targets,
    controls with --allow-controls, no context checks with --contexts ''."""
    genes, perts = _bundle(tmp_path)
    a = _set(_pred(9), 2, 3, 0.0)
    X = a.X.toarray()
    X[2, 3] = 1_000_000 - X[2].sum()
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "cap.h5ad")
    cases = [
        ("cap.h5ad", ["--contexts", "A,B,C", "--perts", perts], {"contexts": "A,B,C", "perts": perts}),
        ("cap.h5ad", ["--contexts", "A,B,C", "--no-verify-targets"], {"contexts": "A,B,C", "verify_targets": False}),
        ("cap.h5ad", ["--contexts", "", "--perts", perts], {"contexts": "", "perts": perts}),
    ]
    b = _relabel(_pred(10), 0, "non-targeting")
    b.write_h5ad(tmp_path / "ctl.h5ad")
    cases.append(("ctl.h5ad", ["--contexts", "A,B,C", "--allow-controls", "--no-check-cell-counts", "--perts", perts],
                  {"contexts": "A,B,C", "reject_controls": False, "check_cell_counts": False, "perts": perts}))
    for i, (name, vargs, kw) in enumerate(cases):
        code, text = _vcc([tmp_path / name, "-g", genes, "--cells-per-pert", N, "-o", tmp_path / f"v{i}.vcc", *vargs])
        assert code == 0, text
        p26.prep_vcc2026(tmp_path / name, genes, tmp_path / f"o{i}.vcc", cells_per_pert=N, cli_version="0.3.0", **kw)
        assert (tmp_path / f"o{i}.vcc").read_bytes() == (tmp_path / f"v{i}.vcc").read_bytes(), vargs
