"""``celltwin prep --format vcc2026``: the Virtual Cell Challenge 2026 upload file, as ``vcc prep`` writes it.

Reference: ``vcc prep`` of vcc-cli 0.3.0 (Arc Institute, MIT). Written here from its documented
behaviour and its observable output, not copied. :func:`prep_vcc2026` makes the same checks and
writes the same archive:

* an uncompressed tar (Python's tarfile, PAX format, its default: an extended header only where
  ustar cannot hold a field, e.g. a member over 8 GiB) with two members, in this order: ``meta.json`` then ``pred.h5ad.zst``; both with uid/gid 0, empty
  user/group names, mtime 0 and mode 0644, padded to tarfile's 10240-byte records;
* ``meta.json``: ``json.dumps(meta, sort_keys=True)`` (default separators, no trailing newline)
  of ``{"schema": 1, "nnz": <stored entries of X>, "n_obs", "n_vars", "cli_version",
  "contexts": [...], "perts_fingerprint": "sha256:...", "panel_id": ...}``; the last two only when
  known (``--perts`` given; a ``manifest.json`` with the same contexts beside it). ``cli_version``
  is the one field that names its writer: vcc writes its own version (``0.3.0``), celltwin writes
  ``0.3.0+celltwin.<celltwin version>`` (the format version, with a local label saying who wrote
  it); :func:`prep_vcc2026` takes ``cli_version="0.3.0"`` to reproduce vcc's bytes exactly;
* ``pred.h5ad.zst``: one zstd frame (level 3, multi-threaded mode, whose output does not depend on
  the thread count; no content size, no checksum) of the h5ad that ``anndata.write_h5ad`` writes
  for ``AnnData(X, obs, var)``: X the prediction's raw counts, canonical (sorted, duplicates
  summed; explicit zeros of a sparse input kept, zeros of a dense input dropped), columns in the
  gene list's order, cast to float32 (``encoding=64``: float64), CSR (a CSC input stays CSC);
  obs index ``"0".."n-1"``, columns ``target_gene`` (``output_pert_col``), ``celltype`` (only with
  ``celltype_col``) and the context column; var: the gene names only.

Checks, in vcc's order (the first failure is reported, one line naming the file, the field, what
was expected and what was found; :class:`~celltwin.errors.InputError`, CLI exit code 2): a sparse
X's structure (pointers, lengths, column range); the gene list (header row ``gene_name`` etc.
skipped, no duplicates); unique var_names; at least one cell; the perturbation (and cell type)
column exists; no control cells (``reject_controls``; else controls must be present); the context
column exists and holds exactly the required contexts, each with cells; per context exactly the
perturbations of ``pert_counts.csv`` (``target_gene`` column; optional ``context`` and ``n_cells``
columns; its ``non-targeting`` row ignored) with exactly ``cells_per_pert`` cells each (an
``n_cells`` column wins); a gene list whose length differs from ``expected_gene_dim`` only warns;
var_names are the gene list (the same genes in another order are reordered; missing or extra genes
fail); at most ``max_cell_dim`` cells; at most ``max_nnz`` stored entries; finite values; no cell
total above ``max_counts_per_cell``; no perturbation whose cells are all zero; no negative and no
fractional value (``|x - trunc(x)| > 1e-6``) once cast to the encoding.

Not mirrored: ``--no-require-counts`` / ``--allow-discrete`` (log-normalising the 2025 way: use
``--format vcc2025``), ``--force`` (celltwin replaces an existing output, atomically, as every
celltwin command does), ``--json``.

Memory: a file with a CSR or dense X is read in row blocks, once. Each block is checked and its
output rows are appended to two raw files (values, column indices) in a temporary folder; nothing
is written to the output unless every check passes. The h5ad is then written by anndata from those
files memory-mapped, so the matrix never sits in RAM (dense never at all) and the bytes are
anndata's own. A CSC X, or an AnnData given in memory with a CSC X, is handled whole, in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

__all__ = [
    "CELLS_PER_PERT",
    "EXPECTED_GENE_DIM",
    "MAX_CELL_DIM",
    "MAX_COUNTS_PER_CELL",
    "MAX_NNZ",
    "META_MEMBER",
    "PRED_MEMBER",
    "VCC_CLI_VERSION",
    "Prep2026Result",
    "perts_fingerprint",
    "prep_vcc2026",
    "read_gene_list",
    "read_pert_list",
    "resolve_contexts",
]

VCC_CLI_VERSION = "0.3.0"  # the vcc-cli release whose archive this module writes
META_MEMBER = "meta.json"
PRED_MEMBER = "pred.h5ad.zst"
META_SCHEMA = 1
CONTEXT_COL_DEFAULT = "context"
CELLTYPE_COL_DEFAULT = "celltype"
CELLS_PER_PERT = 400  # cells per perturbation of the 2026 panel
EXPECTED_GENE_DIM = 18533  # genes of the 2026 gene_names.csv (a different list length only warns)
MAX_CELL_DIM = 400_000
MAX_NNZ = 4_750_000_000  # stored entries of X the scorer accepts
MAX_COUNTS_PER_CELL = 1_000_000  # largest per-cell total (sum over genes) the scorer accepts
FRACTION_EPS = 1e-6  # a value is whole when |x - trunc(x)| <= this
MANIFEST_NAME = "manifest.json"  # the controls bundle's manifest: the phase's contexts, panel_id
BLOCK_ROWS = 4096  # most rows per block
BLOCK_VALUES = 1 << 24  # most stored values (CSR) or elements (dense) per block
_GENE_LIST_HEADERS = frozenset({"gene_name", "gene", "gene_symbol", "gene_names", "genes"})
_ZSTD_MAX_THREADS = 8
_GUIDE_SUFFIX = re.compile(r"-\d$")
_INT32_MAX = int(np.iinfo(np.int32).max)


def celltwin_cli_version() -> str:
    """``meta.json``'s ``cli_version`` as celltwin writes it: ``0.3.0+celltwin.<version>``.

    A PEP 440 local version: anything parsing it reads the vcc-cli format release (0.3.0), and the
    local label says which program wrote the file.
    """
    from celltwin import __version__

    local = ".".join(p for p in re.split(r"[^A-Za-z0-9]+", str(__version__)) if p)
    return f"{VCC_CLI_VERSION}+celltwin.{local or 'unknown'}"


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sample(items, k: int = 5) -> str:
    items = sorted(map(str, items))
    return ", ".join(items[:k]) + (f", ... (+{len(items) - k} more)" if len(items) > k else "")


# ------------------------------------------------------------------------------ reference files
def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """The genes of ``gene_names.csv`` in order: the first column, read as vcc reads it.

    pandas ``read_csv(header=None)``, first column as strings; a first row that is a header
    (``gene_name``, ``gene``, ``gene_symbol``, ``gene_names``, ``genes``) is dropped; duplicates
    are an error.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: gene list file not found (expected gene_names.csv: one gene symbol per row)"
        raise InputError(msg)
    try:
        col = pd.read_csv(p, header=None).iloc[:, 0]
    except Exception as e:  # noqa: BLE001 - EmptyDataError, ParserError, decoding errors
        msg = f"{p}: cannot read the gene list as CSV ({type(e).__name__}: {_one_line(e)}); expected one gene per row"
        raise InputError(msg) from None
    genes = col.astype(str).tolist()
    if genes and genes[0].strip().lower() in _GENE_LIST_HEADERS:
        genes = genes[1:]
    if not genes:
        msg = f"{p}: the gene list is empty; expected one gene symbol per row"
        raise InputError(msg)
    seen: set[str] = set()
    dups = {g for g in genes if g in seen or seen.add(g)}
    if dups:
        msg = f"{p}: the gene list has {len(dups)} duplicated gene name(s) ({_sample(dups)}); expected each gene once"
        raise InputError(msg)
    return genes


def read_pert_list(
    path: str | os.PathLike[str], default_n_cells: int | None = CELLS_PER_PERT
) -> dict[str | None, dict[str, int | None]]:
    """``{context: {perturbation: cells}}`` from ``pert_counts.csv`` (vcc's reading).

    Column ``target_gene`` (required), ``context`` (optional: one list per context; without it the
    single key ``None`` applies to every context) and ``n_cells`` (optional: a blank or unreadable
    value means no expectation for that row; without the column every perturbation expects
    ``default_n_cells``). Blank names and the ``non-targeting`` row are skipped.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: perturbation list file not found (expected pert_counts.csv from the controls bundle)"
        raise InputError(msg)
    try:
        frame = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001
        msg = f"{p}: cannot read the perturbation list as CSV ({type(e).__name__}: {_one_line(e)})"
        raise InputError(msg) from None
    if PERT_COL not in frame.columns:
        msg = f"{p}: no {PERT_COL!r} column in the perturbation list; found columns {list(map(str, frame.columns))}"
        raise InputError(msg)
    has_counts = "n_cells" in frame.columns

    def rows(group) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        names = group[PERT_COL].tolist()
        counts = group["n_cells"].tolist() if has_counts else [None] * len(names)
        for value, raw in zip(names, counts, strict=True):
            if pd.isna(value):
                continue
            name = str(value).strip()
            if not name or name == CONTROL_LABEL:
                continue
            n: int | None = default_n_cells
            if has_counts:
                try:
                    n = None if pd.isna(raw) else int(float(raw))
                except (TypeError, ValueError, OverflowError):
                    n = None
            out[name] = n
        return out

    if CONTEXT_COL_DEFAULT in frame.columns:
        expected = {str(c): rows(g) for c, g in frame.groupby(frame[CONTEXT_COL_DEFAULT].astype(str))}
    else:
        expected = {None: rows(frame)}
    if not any(expected.values()):
        msg = f"{p}: the perturbation list names no perturbation (column {PERT_COL!r})"
        raise InputError(msg)
    return expected


def perts_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """``sha256:<hex>`` of the sorted unique ``target_gene`` names of ``pert_counts.csv`` (vcc's
    ``perts_fingerprint``: names stripped, blanks dropped, the control row included); ``None``
    when unreadable."""
    if not path:
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or PERT_COL not in reader.fieldnames:
                return None
            names = sorted({(row.get(PERT_COL) or "").strip() for row in reader} - {""})
    except Exception:  # noqa: BLE001 - vcc's contract: unknown, never an error
        return None
    if not names:
        return None
    return "sha256:" + hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def _read_manifest(*near) -> tuple[tuple[str, ...], str | None] | None:
    """``(contexts, panel_id)`` of the first usable ``manifest.json`` beside one of ``near``."""
    seen: set[Path] = set()
    for p in near:
        if not p:
            continue
        cand = Path(p).expanduser().resolve().parent / MANIFEST_NAME
        if cand in seen:
            continue
        seen.add(cand)
        try:
            if not cand.is_file() or cand.stat().st_size > 256 * 1024:
                continue
            data = json.loads(cand.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - an unusable manifest is "not found"
            continue
        if not isinstance(data, dict):
            continue
        ctx = data.get("contexts")
        if not isinstance(ctx, list) or not ctx or not all(isinstance(c, str) and c.strip() for c in ctx):
            continue
        panel = data.get("panel_id")
        return tuple(c.strip() for c in ctx), (panel if isinstance(panel, str) and panel else None)
    return None


def resolve_contexts(
    contexts: str | Sequence[str] | None, *, perts=None, genes=None
) -> tuple[tuple[str, ...], str | None]:
    """``(contexts, panel_id)``: ``contexts`` when given ("A,B,C"; "" disables the context checks),
    else the ``manifest.json`` of the controls bundle beside ``perts`` or ``genes``.

    ``panel_id`` (recorded in ``meta.json``) comes from that manifest, only when its contexts are
    the ones used.
    """
    for flag, p in (("--perts", perts), ("-g/--genes", genes)):
        if p is not None and isinstance(p, (str, os.PathLike)) and not Path(p).expanduser().exists():
            msg = f"{flag} {p}: file not found"
            raise InputError(msg)
    paths = [p for p in (perts, genes) if isinstance(p, (str, os.PathLike))]
    manifest = _read_manifest(*paths)
    if contexts is not None:
        if isinstance(contexts, str):
            ctx = tuple(c.strip() for c in contexts.split(",") if c.strip())
        else:
            ctx = tuple(str(c).strip() for c in contexts if str(c).strip())
        panel = manifest[1] if manifest is not None and set(manifest[0]) == set(ctx) else None
        return ctx, panel
    if manifest is not None:
        return manifest
    msg = (f"cannot tell which contexts the submission must cover: no {MANIFEST_NAME} (the controls bundle's) "
           "beside --perts or -g/--genes; give --contexts A,B,C (validation phase) or D,E,F (final phase)")
    raise ConfigError(msg)


# ----------------------------------------------------------------------------------- the input
class _Input:
    """The prediction: obs, var names and X by row blocks (or whole, for a CSC matrix)."""

    def __init__(self, prediction) -> None:
        import anndata as ad
        import scipy.sparse as sp

        self.src = None
        self.matrix = None  # an in-memory X (AnnData given, CSC file)
        if isinstance(prediction, (str, os.PathLike)):
            from celltwin.data.source import H5adSource
            from celltwin.eval._load import read_h5ad

            self.name = str(prediction)
            try:
                src = H5adSource(prediction)
            except InputError:
                src = None
            if src is not None and src.x_format in ("csr", "dense"):
                self.src, self.fmt = src, src.x_format
                self.obs, self.var_names = src.obs, [str(g) for g in src.var_names]
                self.n_obs, self.n_vars = src.n_obs, src.n_vars
                return
            if src is not None:
                src.close()
            adata = read_h5ad(prediction)  # CSC or another encoding: in memory (names the failure)
        elif isinstance(prediction, ad.AnnData):
            self.name, adata = "prediction", prediction
        else:
            msg = f"prediction: expected a path to an .h5ad file or an AnnData, got {type(prediction).__name__}"
            raise InputError(msg)
        X = adata.X
        if X is None:
            msg = f"{self.name}: X is missing (None); expected the predicted counts, cells x genes"
            raise InputError(msg)
        if sp.issparse(X):
            if X.format not in ("csr", "csc"):
                msg = f"{self.name}: X is a {X.format} matrix; expected CSR, CSC or a dense array"
                raise InputError(msg)
            self.fmt = X.format
        else:
            X = np.asarray(X)
            if X.ndim != 2:
                msg = f"{self.name}: X has {X.ndim} dimensions; expected a cells x genes matrix"
                raise InputError(msg)
            self.fmt = "dense"
        self.matrix = X
        self.obs, self.var_names = adata.obs, [str(g) for g in adata.var_names]
        self.n_obs, self.n_vars = int(adata.n_obs), int(adata.n_vars)

    @property
    def whole(self) -> bool:
        """True when X is handled as one matrix (CSC): no row blocks."""
        return self.fmt == "csc"

    def close(self) -> None:
        if self.src is not None:
            self.src.close()

    def check_structure(self) -> None:
        """A sparse X's index bookkeeping (vcc's ``validate_matrix_structure``): pointers start at 0,
        never decrease, end within the stored values; as many indices as values. Column ranges are
        checked block by block (:meth:`blocks`). A CSC matrix is then made canonical."""
        if self.fmt == "dense":
            return
        if self.src is not None:
            import h5py

            try:
                with h5py.File(self.src.path, "r") as f:
                    g = f["X"]
                    indptr = g["indptr"][:].astype(np.int64)
                    n_data, n_ind = int(g["data"].shape[0]), int(g["indices"].shape[0])
            except Exception as e:  # noqa: BLE001
                msg = f"{self.name}: cannot read X's CSR arrays ({type(e).__name__}: {_one_line(e)})"
                raise InputError(msg) from None
            n_major, n_minor, axis = self.n_obs, self.n_vars, "row"
        else:
            X = self.matrix
            indptr = np.asarray(X.indptr).astype(np.int64)
            n_data, n_ind = int(X.data.shape[0]), int(np.asarray(X.indices).shape[0])
            n_major, n_minor, axis = (X.shape[0], X.shape[1], "row") if self.fmt == "csr" else \
                (X.shape[1], X.shape[0], "column")
        where = f"{self.name}: X ({self.fmt.upper()}) is corrupted"
        if indptr.shape[0] != n_major + 1:
            msg = f"{where}: indptr has {indptr.shape[0]} entries, expected {n_major + 1} ({n_major} {axis}s + 1)"
            raise InputError(msg)
        if indptr[0] != 0:
            msg = f"{where}: indptr starts at {int(indptr[0])}, expected 0"
            raise InputError(msg)
        steps = np.diff(indptr)
        if np.any(steps < 0):
            first = int(np.argmax(steps < 0))
            msg = f"{where}: indptr decreases at {axis} {first} (length {int(steps[first])}); expected non-decreasing"
            raise InputError(msg)
        if n_ind != n_data:
            msg = f"{where}: {n_data} stored values but {n_ind} indices; expected as many"
            raise InputError(msg)
        if int(indptr[-1]) > n_data:
            msg = f"{where}: indptr ends at {int(indptr[-1])}, beyond the {n_data} stored values"
            raise InputError(msg)
        if self.matrix is not None:
            live = np.asarray(self.matrix.indices)[: int(indptr[-1])]
            if live.size and (int(live.min()) < 0 or int(live.max()) >= n_minor):
                msg = (f"{where}: an index is out of range (found {int(live.min())}..{int(live.max())}, "
                       f"expected 0..{n_minor - 1})")
                raise InputError(msg)
            X = self.matrix.copy()  # the caller's AnnData is never modified
            X.sum_duplicates()  # sorted, duplicates summed (explicit zeros kept)
            X.prune()  # slack beyond indptr[-1] dropped
            self.matrix = X

    def _bounds(self) -> list[tuple[int, int]]:
        n = self.n_obs
        if self.fmt == "dense":
            rows = max(1, min(BLOCK_ROWS, BLOCK_VALUES // max(self.n_vars, 1)))
            return [(a, min(a + rows, n)) for a in range(0, n, rows)]
        indptr = self.src.row_nnz() if self.src is not None else np.diff(self.matrix.indptr)
        cum = np.concatenate([[0], np.cumsum(indptr, dtype=np.int64)])
        out, a = [], 0
        while a < n:
            b = int(np.searchsorted(cum, cum[a] + BLOCK_VALUES, side="right")) - 1
            b = min(max(b, a + 1), a + BLOCK_ROWS, n)
            out.append((a, b))
            a = b
        return out

    def blocks(self) -> Iterator[tuple[int, int, Any]]:
        """``(a, b, rows a..b of X)`` in the stored dtype: canonical CSR (vcc's ``canonicalize_matrix``
        acts row by row, so per block is the same) or a dense ndarray; a CSC X comes whole."""
        if self.whole:
            yield 0, self.n_obs, self.matrix
            return
        import scipy.sparse as sp

        for a, b in self._bounds():
            if self.src is not None:
                blk = self.src.read_stored(np.arange(a, b, dtype=np.int64))
            else:
                blk = self.matrix[a:b]
            if self.fmt == "dense":
                yield a, b, np.asarray(blk)
                continue
            blk = sp.csr_matrix(blk)
            if blk.indices.size and (int(blk.indices.min()) < 0 or int(blk.indices.max()) >= self.n_vars):
                msg = (f"{self.name}: X (CSR) is corrupted: a column index of rows {a}..{b - 1} is out of range "
                       f"(found {int(blk.indices.min())}..{int(blk.indices.max())}, expected 0..{self.n_vars - 1})")
                raise InputError(msg)
            blk.sum_duplicates()
            yield a, b, blk


# ------------------------------------------------------------------------------------ the scan
@dataclass
class _Scan:
    """What one pass over X learnt (every value check of vcc, decided after the pass in vcc's order)."""

    n_obs: int
    nnz_in: int = 0  # stored entries of the input (dense: nonzeros), canonical
    n_nan: int = 0
    n_inf: int = 0
    bad_rows: list[int] = field(default_factory=list)  # first rows holding non-finite values
    n_bad_rows: int = 0
    negative_row: int | None = None  # first row with a negative value, once cast
    fraction_row: int | None = None  # first row with a fractional value, once cast
    fraction_value: float = 0.0
    totals: np.ndarray = None  # type: ignore[assignment]
    row_nnz: np.ndarray = None  # type: ignore[assignment]  # stored entries per output row
    out_matrix: Any = None  # whole mode: the output matrix

    def __post_init__(self) -> None:
        self.totals = np.zeros(self.n_obs, dtype=np.float64)
        self.row_nnz = np.zeros(self.n_obs, dtype=np.int64)


def _row_of(indptr: np.ndarray, pos: int) -> int:
    return int(np.searchsorted(indptr, pos, side="right")) - 1


def _scan_block(scan: _Scan, a: int, blk, cols, dtype, fmt: str):
    """Check one block (vcc's operations on these rows) and return its output matrix."""
    import scipy.sparse as sp

    if sp.issparse(blk):
        if cols is not None:
            blk = blk[:, cols]  # vcc's adata[:, genes]: entries keep their stored order
        data = blk.data
        scan.nnz_in += int(blk.nnz)
        bad = ~np.isfinite(data) if data.dtype.kind in "fc" else None
        if bad is not None and bad.any():
            nan = np.isnan(data)
            scan.n_nan += int(nan.sum())
            scan.n_inf += int(bad.sum() - nan.sum())
            if fmt == "csc":
                rows = np.unique(blk.indices[bad])
            else:
                rows = np.unique(np.repeat(np.arange(blk.shape[0]), np.diff(blk.indptr))[bad])
            scan.n_bad_rows += rows.size
            if len(scan.bad_rows) < 10:
                scan.bad_rows.extend((rows[: 10 - len(scan.bad_rows)] + a).tolist())
        scan.totals[a:a + blk.shape[0]] = np.asarray(blk.sum(axis=1)).ravel()
        out = blk.astype(dtype)
    else:
        x = np.asarray(blk)
        if cols is not None:
            x = x[:, cols]
        scan.nnz_in += int(np.count_nonzero(x))
        if x.dtype.kind in "fc":
            bad = ~np.isfinite(x)
            if bad.any():
                nan = np.isnan(x)
                scan.n_nan += int(nan.sum())
                scan.n_inf += int(bad.sum() - nan.sum())
                rows = np.flatnonzero(bad.any(axis=1))
                scan.n_bad_rows += rows.size
                if len(scan.bad_rows) < 10:
                    scan.bad_rows.extend((rows[: 10 - len(scan.bad_rows)] + a).tolist())
        scan.totals[a:a + x.shape[0]] = x.sum(axis=1)
        out = sp.csr_matrix(x.astype(dtype))
    d = out.data
    if d.size:
        if scan.negative_row is None and d.min() < 0:
            pos = int(np.argmax(d < 0))
            scan.negative_row = a + (int(out.indices[pos]) if out.format == "csc" else _row_of(out.indptr, pos))
        if scan.fraction_row is None:
            with np.errstate(invalid="ignore"):  # inf - inf (refused as non-finite anyway)
                frac = np.abs(d - np.trunc(d)) > FRACTION_EPS
            if frac.any():
                pos = int(np.argmax(frac))
                scan.fraction_value = float(d[pos])
                scan.fraction_row = a + (int(out.indices[pos]) if out.format == "csc" else _row_of(out.indptr, pos))
    if out.format == "csr":
        scan.row_nnz[a:a + out.shape[0]] = np.diff(out.indptr)
    return out


# ------------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class Prep2026Result:
    """What :func:`prep_vcc2026` checked and wrote (``path`` is ``None`` for a dry run)."""

    path: Path | None
    n_cells: int
    n_genes: int
    nnz: int  # stored entries of the packaged X (meta.json's nnz); the input's count for a dry run
    contexts: tuple[str, ...]
    cells_per_context: dict[str, int]
    verified_targets: bool
    reordered_genes: bool
    meta: dict | None
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ the checks
def _check_obs(inp: _Input, *, pert_col, celltype_col, control_label, reject_controls, context_col,
               contexts: tuple[str, ...]) -> dict[str, int]:
    obs, name = inp.obs, inp.name
    if inp.n_obs == 0:
        msg = f"{name}: 0 cells; expected the predicted cells of every perturbation"
        raise InputError(msg)
    if pert_col not in obs:
        msg = f"{name}: perturbation column obs[{pert_col!r}] is missing; obs has {list(map(str, obs.columns))}"
        raise InputError(msg)
    if celltype_col and celltype_col not in obs:
        msg = f"{name}: cell type column obs[{celltype_col!r}] is missing; obs has {list(map(str, obs.columns))}"
        raise InputError(msg)
    labels = obs[pert_col].astype(str)
    n_ctrl = int((labels == control_label).sum())
    if reject_controls and n_ctrl:
        msg = (f"{name}: obs[{pert_col!r}] has {n_ctrl} {control_label!r} control cells; expected none (the 2026 "
               "upload holds predicted perturbations only, scoring uses the held-out controls)")
        raise InputError(msg)
    if not reject_controls and not n_ctrl:
        msg = f"{name}: control label {control_label!r} not found in obs[{pert_col!r}] (controls allowed, so required)"
        raise InputError(msg)
    if not contexts:
        return {}
    if context_col not in obs:
        msg = (f"{name}: context column obs[{context_col!r}] is missing; expected each cell's context "
               f"({', '.join(contexts)}); obs has {list(map(str, obs.columns))}")
        raise InputError(msg)
    values = obs[context_col].astype(str)
    present = set(values.unique())
    unknown = sorted(present - set(contexts))
    if unknown:
        msg = f"{name}: obs[{context_col!r}] has unknown context(s) {_sample(unknown)}; expected only {', '.join(contexts)}"
        raise InputError(msg)
    missing = [c for c in contexts if c not in present]
    if missing:
        msg = (f"{name}: obs[{context_col!r}] has no cells of context(s) {', '.join(missing)}; expected every one "
               f"of {', '.join(contexts)} (found {', '.join(sorted(present)) or 'none'})")
        raise InputError(msg)
    return {c: int((values == c).sum()) for c in contexts}


def _check_targets(inp: _Input, expected, perts_path, *, pert_col, context_col, control_label,
                   contexts: tuple[str, ...], check_cell_counts: bool) -> None:
    name = inp.name
    labels = inp.obs[pert_col].astype(str)

    def compare(where: str, observed: set[str], want: set[str]) -> None:
        miss, extra = want - observed, observed - want
        if not miss and not extra:
            return
        parts = []
        if miss:
            parts.append(f"{len(miss)} listed perturbation(s) missing ({_sample(miss)})")
        if extra:
            parts.append(f"{len(extra)} not in the list ({_sample(extra)})")
        hint = ("; labels like 'ADNP-1' are construct ids, give the gene symbol ('ADNP')"
                if any(_GUIDE_SUFFIX.search(u) for u in extra) else "")
        msg = (f"{name}: {where}obs[{pert_col!r}] does not match the perturbation list {perts_path} "
               f"({len(want)} perturbations): {'; '.join(parts)}{hint}")
        raise InputError(msg)

    if not contexts:
        pool = expected.get(None) or {k: v for m in expected.values() for k, v in m.items()}
        compare("", set(labels) - {control_label}, set(pool))
        return
    values = inp.obs[context_col].astype(str)
    for c in contexts:
        want = expected.get(c, expected.get(None))
        if want is None:
            msg = f"{perts_path}: the perturbation list has no rows for context {c!r} (column 'context')"
            raise InputError(msg)
        in_c = (values == c).to_numpy()
        compare(f"context {c}: ", set(labels[in_c]) - {control_label}, set(want))
        if check_cell_counts:
            actual = labels[in_c].value_counts()
            wrong = [(g, int(actual.get(g, 0)), e) for g, e in sorted(want.items())
                     if e is not None and e >= 1 and g != control_label and int(actual.get(g, 0)) != e]
            if wrong:
                shown = ", ".join(f"{g} has {n}" for g, n, _ in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
                exp = "/".join(str(v) for v in sorted({e for *_, e in wrong}))
                msg = (f"{name}: context {c}: {len(wrong)} perturbation(s) of obs[{pert_col!r}] have the wrong "
                       f"number of cells ({shown}); expected exactly {exp} cells each")
                raise InputError(msg)


def _check_var_unique(inp: _Input) -> None:
    var = inp.var_names
    if len(set(var)) != len(var):
        seen: set[str] = set()
        dups = {g for g in var if g in seen or seen.add(g)}
        msg = f"{inp.name}: var_names have duplicated gene names ({_sample(dups)}); expected each gene once"
        raise InputError(msg)


def _gene_columns(inp: _Input, genes: list[str]) -> tuple[np.ndarray | None, bool]:
    var = inp.var_names
    if var == genes:
        return None, False
    var_set, gene_set = set(var), set(genes)
    missing, extra = gene_set - var_set, var_set - gene_set
    if missing or extra:
        msg = (f"{inp.name}: var_names do not match the gene list ({len(genes)} genes): {len(missing)} missing "
               f"({_sample(missing)}), {len(extra)} not in the list ({_sample(extra)})")
        raise InputError(msg)
    pos = {g: i for i, g in enumerate(var)}
    return np.array([pos[g] for g in genes], dtype=np.int64), True


def _check_values(scan: _Scan, inp: _Input, labels: np.ndarray, *, max_nnz, max_counts_per_cell,
                  dtype) -> None:
    name = inp.name
    if max_nnz and scan.nnz_in > max_nnz:
        msg = (f"{name}: X stores {scan.nnz_in:,} entries ({scan.nnz_in / max(inp.n_obs, 1):,.0f} per cell); "
               f"expected at most {max_nnz:,} (the scorer's density limit; store X sparse, without explicit zeros, "
               "and predict fewer expressed genes per cell)")
        raise InputError(msg)
    if scan.n_nan or scan.n_inf:
        rows = ", ".join(map(str, scan.bad_rows)) + (" ..." if scan.n_bad_rows > len(scan.bad_rows) else "")
        msg = (f"{name}: X holds {scan.n_nan + scan.n_inf} non-finite value(s) ({scan.n_nan} NaN, {scan.n_inf} inf) "
               f"in {scan.n_bad_rows} cell(s) (rows {rows}); expected finite counts")
        raise InputError(msg)
    t = scan.totals
    if max_counts_per_cell and t.size and float(t.max()) > max_counts_per_cell:
        over = int((t > max_counts_per_cell).sum())
        worst = int(np.argmax(t))
        msg = (f"{name}: {over} cell(s) of X total more than {max_counts_per_cell:,} counts (worst: row {worst}, "
               f"{float(t[worst]):,.6g}); expected per-cell totals <= {max_counts_per_cell:,} (the scorer's cap)")
        raise InputError(msg)
    uniq, inv = np.unique(labels, return_inverse=True)
    nonzero = np.zeros(uniq.size, dtype=bool)
    np.logical_or.at(nonzero, inv, t != 0)
    empty = uniq[~nonzero]
    if empty.size:
        msg = (f"{name}: {empty.size} perturbation(s) have all-zero predictions in every cell ({_sample(empty)}); "
               "expected some counts (the model did not run for them?)")
        raise InputError(msg)
    if scan.negative_row is not None:
        msg = f"{name}: X has negative values (first in row {scan.negative_row}); expected non-negative counts"
        raise InputError(msg)
    if scan.fraction_row is not None:
        msg = (f"{name}: X has fractional values once cast to {np.dtype(dtype).name} (e.g. {scan.fraction_value:g} "
               f"in row {scan.fraction_row}); expected raw integer counts (not log-normalised; round predictions)")
        raise InputError(msg)


# ----------------------------------------------------------------------------------- the writer
def _zstd_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _ZSTD_MAX_THREADS))


def _tar_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info


def _widen(path: Path, n: int, block: int = 1 << 24) -> Path:
    """An int64 copy of an int32 raw file of ``n`` values (scipy indexes with int64 past 2**31 entries)."""
    wide = path.with_suffix(".i64")
    src = np.memmap(path, dtype=np.int32, mode="r", shape=(n,))
    with open(wide, "wb") as f:
        for s in range(0, n, block):
            src[s:s + block].astype(np.int64).tofile(f)
    del src
    path.unlink()
    return wide


def _write_archive(out: Path, tmp: Path, X, obs, var, meta: dict) -> None:
    import anndata as ad
    import zstandard

    h5 = tmp / "pred.h5ad"
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(h5)
    del X
    zst = tmp / PRED_MEMBER
    cctx = zstandard.ZstdCompressor(level=3, threads=_zstd_threads())
    with open(h5, "rb") as fin, open(zst, "wb") as fout:
        cctx.copy_stream(fin, fout)
    h5.unlink()
    meta_path = tmp / META_MEMBER
    meta_path.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
    with atomic_path(out, suffix=".vcc") as tmp_out, \
            tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(meta_path, arcname=META_MEMBER, filter=_tar_member)
        tar.add(zst, arcname=PRED_MEMBER, filter=_tar_member)


# ------------------------------------------------------------------------------------- prep
def prep_vcc2026(
    prediction,
    genes: Sequence[str] | str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    perts: str | os.PathLike[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    verify_targets: bool = True,
    check_cell_counts: bool = True,
    cells_per_pert: int | None = CELLS_PER_PERT,
    pert_col: str = PERT_COL,
    celltype_col: str | None = None,
    control_label: str = CONTROL_LABEL,
    output_pert_col: str = PERT_COL,
    output_celltype_col: str = CELLTYPE_COL_DEFAULT,
    context_col: str = CONTEXT_COL_DEFAULT,
    encoding: int = 32,
    reject_controls: bool = True,
    expected_gene_dim: int | None = EXPECTED_GENE_DIM,
    max_cell_dim: int | None = MAX_CELL_DIM,
    max_nnz: int | None = MAX_NNZ,
    max_counts_per_cell: int | None = MAX_COUNTS_PER_CELL,
    dry_run: bool = False,
    cli_version: str | None = None,
) -> Prep2026Result:
    """Check a prediction and write the 2026 ``.vcc`` upload file (see the module docstring).

    ``prediction``: an ``.h5ad`` path (read in row blocks) or an AnnData. ``genes``: the gene list
    (a path to ``gene_names.csv`` or the names). ``perts``: ``pert_counts.csv`` (needed unless
    ``verify_targets=False``). ``contexts``: "A,B,C" or a sequence (``""``/``()`` disables the context
    checks); ``None`` reads the controls bundle's ``manifest.json`` beside ``perts`` / ``genes``.
    ``cells_per_pert=None``: no expected count unless pert_counts.csv has an ``n_cells`` column.
    ``None`` for ``expected_gene_dim``, ``max_cell_dim``, ``max_nnz`` or ``max_counts_per_cell``
    disables that check. ``dry_run``: check only (``output`` may be ``None``). ``cli_version``:
    ``meta.json``'s writer field (default :func:`celltwin_cli_version`). The write is atomic.
    """
    import pandas as pd

    if encoding not in (32, 64):
        msg = f"encoding must be 32 or 64 (float bits of X), got {encoding!r}"
        raise ConfigError(msg)
    if cells_per_pert is not None and cells_per_pert < 1:
        msg = f"cells_per_pert must be >= 1 (or -1 / None: no built-in expectation), got {cells_per_pert}"
        raise ConfigError(msg)
    if max_counts_per_cell is not None and max_counts_per_cell < 1:
        msg = f"max_counts_per_cell must be >= 1 (or -1 / None: no cap), got {max_counts_per_cell}"
        raise ConfigError(msg)
    if output is None and not dry_run:
        raise ConfigError("prep: give an output path (or dry_run=True)")
    if verify_targets and perts is None:
        msg = ("--perts (pert_counts.csv of the controls bundle) is needed to check the perturbation list; "
               "give it, or --no-verify-targets")
        raise ConfigError(msg)
    ctx, panel_id = resolve_contexts(contexts, perts=perts,
                                     genes=genes if isinstance(genes, (str, os.PathLike)) else None)
    out_cols = [output_pert_col, *([output_celltype_col] if celltype_col else []), *([context_col] if ctx else [])]
    if len(set(out_cols)) != len(out_cols):
        msg = f"the output obs columns must have different names, got {out_cols}"
        raise ConfigError(msg)
    dtype = np.float32 if encoding == 32 else np.float64

    inp = _Input(prediction)
    try:
        inp.check_structure()
        gene_list = (read_gene_list(genes) if isinstance(genes, (str, os.PathLike))
                     else [str(g) for g in genes])
        if not isinstance(genes, (str, os.PathLike)) and len(set(gene_list)) != len(gene_list):
            raise InputError("genes: the gene list has duplicated names; expected each gene once")
        _check_var_unique(inp)
        per_context = _check_obs(inp, pert_col=pert_col, celltype_col=celltype_col, control_label=control_label,
                                 reject_controls=reject_controls, context_col=context_col, contexts=ctx)
        verified = False
        if verify_targets:
            expected = read_pert_list(perts, default_n_cells=cells_per_pert)
            _check_targets(inp, expected, perts, pert_col=pert_col, context_col=context_col,
                           control_label=control_label, contexts=ctx, check_cell_counts=check_cell_counts)
            verified = True
        warns: list[str] = []
        if not verify_targets:
            warns.append("perturbation labels were not checked against pert_counts.csv (--no-verify-targets)")
        if expected_gene_dim and len(gene_list) != expected_gene_dim:
            warns.append(f"the gene list has {len(gene_list)} genes, not the expected {expected_gene_dim}; "
                         f"expecting {len(gene_list)} genes")
        cols, reordered = _gene_columns(inp, gene_list)
        if reordered:
            warns.append("the input has the listed genes in another order; reordered to the gene list")
        if max_cell_dim and inp.n_obs > max_cell_dim:
            msg = f"{inp.name}: {inp.n_obs} cells; expected at most {max_cell_dim} (--max-cell-dim)"
            raise InputError(msg)

        labels = inp.obs[pert_col].astype(str).to_numpy()
        obs = pd.DataFrame({output_pert_col: inp.obs[pert_col].to_numpy()},
                           index=np.arange(inp.n_obs).astype(str))
        if celltype_col:
            obs[output_celltype_col] = inp.obs[celltype_col].to_numpy()
        if ctx:
            obs[context_col] = inp.obs[context_col].astype(str).to_numpy()
        var = pd.DataFrame(index=np.asarray(gene_list, dtype=object))

        scan = _Scan(inp.n_obs)
        out = Path(output) if output is not None else None
        tmp_ctx = (tempfile.TemporaryDirectory(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmpdir",
                                               dir=out.parent if out.parent.exists() else None)
                   if not dry_run else None)
        try:
            tmp = Path(tmp_ctx.name) if tmp_ctx is not None else None
            _run_pass(inp, scan, cols, dtype, tmp)
            _check_values(scan, inp, labels, max_nnz=max_nnz, max_counts_per_cell=max_counts_per_cell,
                          dtype=dtype)
            if tmp is None:
                return Prep2026Result(None, inp.n_obs, len(gene_list), scan.nnz_in, ctx, per_context, verified,
                                      reordered, None, warns)
            X, nnz = _assemble(scan, tmp, inp, len(gene_list), dtype)
            meta = {"schema": META_SCHEMA, "nnz": nnz, "n_obs": int(inp.n_obs), "n_vars": len(gene_list),
                    "cli_version": cli_version or celltwin_cli_version(), "contexts": list(ctx),
                    "perts_fingerprint": perts_fingerprint(perts) if perts else None, "panel_id": panel_id}
            meta = {k: v for k, v in meta.items() if v is not None}
            _write_archive(out, tmp, X, obs, var, meta)
        finally:
            if tmp_ctx is not None:
                tmp_ctx.cleanup()
    finally:
        inp.close()
    return Prep2026Result(out, inp.n_obs, len(gene_list), nnz, ctx, per_context, verified, reordered, meta, warns)


def _run_pass(inp: _Input, scan: _Scan, cols, dtype, tmp: Path | None) -> None:
    """The one pass over X: every block checked (into ``scan``) and, unless ``tmp`` is ``None`` (a dry
    run), its output rows appended to ``tmp/data.raw`` and ``tmp/indices.raw`` (int32), or kept whole."""
    import contextlib

    with contextlib.ExitStack() as stack:
        fd = fi = None
        if tmp is not None and not inp.whole:
            fd = stack.enter_context(open(tmp / "data.raw", "wb"))
            fi = stack.enter_context(open(tmp / "indices.raw", "wb"))
        for a, _b, blk in inp.blocks():
            o = _scan_block(scan, a, blk, cols, dtype, inp.fmt)
            if inp.whole:
                scan.out_matrix = o if tmp is not None else None
            elif fd is not None:
                o.data.tofile(fd)
                o.indices.astype(np.int32, copy=False).tofile(fi)


def _assemble(scan: _Scan, tmp: Path, inp: _Input, n_genes: int, dtype):
    """``(X, nnz)``: the output matrix, CSR from the raw files memory-mapped (or the whole-mode matrix)."""
    import scipy.sparse as sp

    if inp.whole:
        X = scan.out_matrix
        return X, int(X.nnz)
    nnz = int(scan.row_nnz.sum())
    # scipy's index dtype for this matrix (what vcc's in-memory CSR has): int64 only past int32
    wide = max(nnz, inp.n_obs, n_genes) > _INT32_MAX
    idx_dtype = np.int64 if wide else np.int32
    indptr = np.zeros(inp.n_obs + 1, dtype=idx_dtype)
    np.cumsum(scan.row_nnz, out=indptr[1:])
    ind_path = tmp / "indices.raw"
    if wide:
        ind_path = _widen(ind_path, nnz)
    if nnz:
        data = np.memmap(tmp / "data.raw", dtype=dtype, mode="r", shape=(nnz,))
        indices = np.memmap(ind_path, dtype=idx_dtype, mode="r", shape=(nnz,))
    else:
        data, indices = np.zeros(0, dtype=dtype), np.zeros(0, dtype=idx_dtype)
    X = sp.csr_matrix((data, indices, indptr), shape=(inp.n_obs, n_genes))
    return X, nnz
