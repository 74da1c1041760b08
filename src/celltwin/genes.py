"""Gene embedding tables: gene vectors on disk, symbol mapping, coverage of a data set.

* **Tables** (:class:`GeneTable`, :func:`load_gene_table`, :func:`save_gene_table`): a gene
  list plus a float32 matrix (G, D). Accepted files: ``.safetensors`` (our layout: one
  tensor ``embeddings`` (G, D) + the gene list in the metadata; or one 1-D tensor per gene
  symbol), ``.pt``/``.pth`` (a dict symbol -> 1-D tensor, the common torch layout),
  ``.npy`` (a (G, D) matrix; the gene list comes from ``gene_list=`` or a sibling
  ``<stem>.genes.txt`` / ``genes.txt``), ``.csv``/``.tsv`` (first column the symbol, the
  other columns the vector; a header row is detected when its second field is not a number).
  ``celltwin genes embed`` makes such a table from protein sequences
  (:mod:`celltwin.protein_embed`).
* **Symbol mapping** (:class:`HgncIndex`, :func:`align_gene_table`): data sets name genes by
  current symbols, old symbols, aliases or Ensembl IDs. With the HGNC table
  (``hgnc_genes.tsv``, read by :mod:`celltwin.data.gene_ids`) every name is resolved to an
  approved symbol and genes are matched on that. Genes that still have no vector are
  reported (:class:`GeneCoverage`), never silently zero-filled: the SE model gives each of
  them a learned fallback vector.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

__all__ = [
    "GeneCoverage",
    "GeneTable",
    "HgncIndex",
    "align_gene_table",
    "load_gene_table",
    "save_gene_table",
]

_TABLE_FORMAT = "celltwin.gene_embeddings.v1"


# ---------------------------------------------------------------------------------------- tables


@dataclass
class GeneTable:
    """Gene symbols (unique) and their vectors ``(G, D)`` float32, row i for ``genes[i]``."""

    genes: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.genes):
            msg = f"gene table: expected a ({len(self.genes)}, D) matrix, got shape {self.vectors.shape}"
            raise InputError(msg)
        if len(set(self.genes)) != len(self.genes):
            dup = sorted({g for g in self.genes if self.genes.count(g) > 1})[:5]
            msg = f"gene table: duplicated gene symbols, e.g. {dup}"
            raise InputError(msg)
        if not np.isfinite(self.vectors).all():
            msg = "gene table: the vectors contain NaN or infinite values"
            raise InputError(msg)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.genes)}


def save_gene_table(table: GeneTable, path: str | Path) -> None:
    """Write ``table`` as safetensors (``embeddings`` (G, D) + genes in the metadata), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        msg = f"gene tables are written as .safetensors, got {path}"
        raise ConfigError(msg)
    meta = {"format": _TABLE_FORMAT, "genes": json.dumps(table.genes)}
    with atomic_path(path) as tmp:
        save_file({"embeddings": np.ascontiguousarray(table.vectors)}, str(tmp), metadata=meta)


def _from_mapping(path: Path, items: Iterable[tuple[str, np.ndarray]]) -> GeneTable:
    genes, rows = [], []
    for k, v in items:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 1:
            msg = f"{path}: entry {k!r} should be a 1-D vector, got shape {v.shape}"
            raise InputError(msg)
        genes.append(str(k))
        rows.append(v)
    if not rows:
        msg = f"{path}: no gene vectors found"
        raise InputError(msg)
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        msg = f"{path}: gene vectors have different lengths {sorted(dims)}"
        raise InputError(msg)
    return GeneTable(genes, np.stack(rows))


def load_gene_table(path: str | Path, gene_list: str | Path | None = None) -> GeneTable:
    """Read a gene embedding table in any of the layouts listed in the module docstring."""
    path = Path(path)
    if not path.is_file():
        msg = f"gene embedding table {path} does not exist"
        raise InputError(msg)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "genes" in meta and "embeddings" in keys:
                return GeneTable(json.loads(meta["genes"]), f.get_tensor("embeddings"))
            return _from_mapping(path, ((k, f.get_tensor(k)) for k in keys))
    if suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            msg = f"{path}: expected a dict gene symbol -> tensor, got {type(obj).__name__}"
            raise InputError(msg)
        return _from_mapping(
            path, ((k, v.float().numpy() if hasattr(v, "numpy") else v) for k, v in obj.items())
        )
    if suffix == ".npy":
        mat = np.load(path, allow_pickle=False)
        if gene_list is None:
            for cand in (path.with_suffix(".genes.txt"), path.parent / "genes.txt"):
                if cand.is_file():
                    gene_list = cand
                    break
        if gene_list is None:
            msg = (f"{path}: a .npy table needs a gene list "
                   f"(gene_list=, or {path.stem}.genes.txt / genes.txt beside it)")
            raise InputError(msg)
        from celltwin.data.preprocess import read_genes_txt

        genes = read_genes_txt(gene_list)
        if len(genes) != mat.shape[0]:
            msg = f"{path}: {mat.shape[0]} rows but the gene list {gene_list} has {len(genes)} names"
            raise InputError(msg)
        return GeneTable(genes, mat)
    if suffix in (".csv", ".tsv", ".txt"):
        delim = "\t" if suffix == ".tsv" else ","
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter=delim) if r]
        if rows:
            try:
                float(rows[0][1])
            except (ValueError, IndexError):
                rows = rows[1:]  # header row
        try:
            items = [(r[0], np.array([float(x) for x in r[1:]])) for r in rows]
        except ValueError as e:
            msg = f"{path}: non-numeric vector entry ({e}); expected 'symbol,v1,v2,...' rows"
            raise InputError(msg) from e
        return _from_mapping(path, items)
    msg = f"{path}: unknown gene table format {suffix!r} (expected .safetensors, .pt, .npy, .csv or .tsv)"
    raise InputError(msg)


# ---------------------------------------------------------------------------------------- HGNC


class HgncIndex:
    """Resolve gene names (symbols, aliases, previous symbols, Ensembl IDs) to approved HGNC symbols.

    A thin adapter over :class:`celltwin.data.gene_ids.HgncTable` (the project's one HGNC
    lookup; its rules, first hit wins: Ensembl ID without version, approved symbol exact, then
    case-insensitive, previous symbol, alias). A name that several genes claim at the first
    matching rule is ambiguous and is not resolved.
    """

    def __init__(self, table) -> None:  # table: celltwin.data.gene_ids.HgncTable
        self.table = table

    @classmethod
    def from_tsv(cls, path: str | Path) -> HgncIndex:
        """Read an HGNC export (``Approved symbol``, ``Ensembl gene ID``, ``Alias symbol``, ...)."""
        from celltwin.data.gene_ids import HgncTable

        return cls(HgncTable.from_tsv(path))

    def resolve(self, name: str) -> tuple[str | None, str]:
        """``(approved symbol or None, rule)``; rule: the matching rule, ``ambiguous`` or ``unmapped``."""
        rule, hits = self.table.lookup(name)
        if len(hits) == 1:
            return self.table.symbols[hits[0]], rule
        return None, ("ambiguous" if hits else "unmapped")


@dataclass
class GeneCoverage:
    """How the genes of a data set were matched to a gene table."""

    n_genes: int
    exact: int  # same name in the table
    mapped: dict[str, str]  # data gene -> table gene, matched through HGNC
    missing: list[str]  # data genes with no vector (they get a learned fallback in the model)

    @property
    def found(self) -> int:
        return self.exact + len(self.mapped)

    @property
    def fraction(self) -> float:
        return self.found / self.n_genes if self.n_genes else 0.0

    def summary(self) -> str:
        head = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
        return (
            f"gene embeddings cover {self.found}/{self.n_genes} genes ({100 * self.fraction:.1f}%): "
            f"{self.exact} by exact name, {len(self.mapped)} through HGNC; {len(self.missing)} missing"
            + (f" ({head})" if self.missing else "")
        )

    def to_dict(self) -> dict[str, object]:
        return {"n_genes": self.n_genes, "exact": self.exact, "mapped": self.mapped, "missing": self.missing}


def align_gene_table(
    table: GeneTable, genes: Sequence[str], hgnc: HgncIndex | None = None
) -> tuple[np.ndarray, np.ndarray, GeneCoverage]:
    """Vectors for ``genes`` (in that order) from ``table``.

    Returns ``(vectors (n, D) float32, found (n,) bool, coverage)``. Rows of missing genes are
    zero *and flagged* in ``found``: callers must replace them (the SE model uses learned
    fallback vectors). Matching: exact name first; then, with ``hgnc``, both names are resolved
    to approved symbols and matched on those. When several table entries resolve to the same
    approved symbol, the one whose own name is the approved symbol wins, else the first in
    table order.
    """
    tidx = table.index()
    by_approved: dict[str, str] = {}
    if hgnc is not None:
        for g in table.genes:
            sym, _ = hgnc.resolve(g)
            if sym is None:
                continue
            if sym not in by_approved or g == sym:
                by_approved[sym] = g
    vec = np.zeros((len(genes), table.dim), dtype=np.float32)
    found = np.zeros(len(genes), dtype=bool)
    exact, mapped, missing = 0, {}, []
    for i, g in enumerate(genes):
        src = None
        if g in tidx:
            src = g
            exact += 1
        elif hgnc is not None:
            sym, _ = hgnc.resolve(g)
            if sym is not None and sym in by_approved:
                src = by_approved[sym]
                mapped[g] = src
        if src is None:
            missing.append(g)
            continue
        vec[i] = table.vectors[tidx[src]]
        found[i] = True
    return vec, found, GeneCoverage(len(genes), exact, mapped, missing)
