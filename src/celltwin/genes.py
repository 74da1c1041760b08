"""Gene embeddings: protein-language-model vectors per gene, tables on disk, symbol mapping.

Three parts:

* **Embedding proteins** (:func:`embed_fasta`): every protein isoform of a gene is run through
  an ESM-2 checkpoint read from a *local* directory (``transformers`` ``EsmModel`` +
  ``EsmTokenizer``; nothing is fetched from a hub). Each isoform's vector is the mean of the
  last hidden layer over its residues (the ``<cls>``/``<eos>`` special tokens and padding are
  excluded, :func:`pool_residues`); a gene's vector is the unweighted mean of its isoforms'
  vectors (:func:`pool_isoforms`). Sequences longer than ``max_residues`` are truncated to
  their first ``max_residues`` residues (ESM-2 was trained on crops of 1,022).
* **Tables** (:class:`GeneTable`, :func:`load_gene_table`, :func:`save_gene_table`): a gene
  list plus a float32 matrix (G, D). Accepted files: ``.safetensors`` (our layout: one
  tensor ``embeddings`` (G, D) + the gene list in the metadata; or one 1-D tensor per gene
  symbol), ``.pt``/``.pth`` (a dict symbol -> 1-D tensor, the common torch layout),
  ``.npy`` (a (G, D) matrix; the gene list comes from ``gene_list=`` or a sibling
  ``<stem>.genes.txt`` / ``genes.txt``), ``.csv``/``.tsv`` (first column the symbol, the
  other columns the vector; a header row is detected when its second field is not a number).
* **Symbol mapping** (:class:`HgncIndex`, :func:`align_gene_table`): data sets name genes by
  current symbols, old symbols, aliases or Ensembl IDs. With the HGNC table
  (``hgnc_genes.tsv``, read by :mod:`celltwin.data.gene_ids`) every name is resolved to an
  approved symbol and genes are matched on that. Genes that still have no vector are
  reported (:class:`GeneCoverage`), never silently zero-filled: the SE model gives each of
  them a learned fallback vector.

FASTA headers accepted by :func:`parse_fasta_header` (first rule that applies wins):

1. UniProt: ``>sp|P04637-2|P53_HUMAN Isoform 2 of ... OS=Homo sapiens OX=9606 GN=TP53 ...``:
   gene = the ``GN=`` value, isoform = the accession (``P04637-2``). A ``sp|``/``tr|`` header
   without ``GN=`` is an error (its gene cannot be known).
2. Ensembl peptide FASTA: ``>ENSP00000269305.4 pep ... gene_symbol:TP53 ...``: gene = the
   ``gene_symbol:`` value, isoform = the first word.
3. ``>SYMBOL|ISOFORM ...`` or ``>SYMBOL ...``: gene = text before the first ``|`` (or the
   whole first word), isoform = the text after it (or the first word).

Sequences are upper-cased; whitespace and a trailing ``*`` (stop) are removed.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FastaRecord",
    "parse_fasta_header",
    "read_fasta",
    "pool_residues",
    "pool_isoforms",
    "embed_fasta",
    "GeneTable",
    "load_gene_table",
    "save_gene_table",
    "HgncIndex",
    "GeneCoverage",
    "align_gene_table",
]

_TABLE_FORMAT = "celltwin.gene_embeddings.v1"


# ----------------------------------------------------------------------------------------- FASTA


@dataclass(frozen=True)
class FastaRecord:
    """One protein sequence: the gene it belongs to, its isoform id and its residues."""

    gene: str
    isoform: str
    sequence: str


_GN = re.compile(r"\bGN=(\S+)")
_ENS_SYMBOL = re.compile(r"\bgene_symbol:(\S+)")


def parse_fasta_header(header: str) -> tuple[str, str]:
    """``(gene, isoform)`` of a FASTA header (with or without the leading ``>``); see module doc."""
    h = header[1:] if header.startswith(">") else header
    h = h.strip()
    if not h:
        msg = "empty FASTA header: expected '>SYMBOL|isoform', a UniProt header with GN=, or gene_symbol:"
        raise InputError(msg)
    first = h.split()[0]
    m = _GN.search(h)
    if m:
        parts = first.split("|")
        iso = parts[1] if len(parts) >= 3 and parts[0] in ("sp", "tr") else first
        return m.group(1), iso
    if first.split("|")[0] in ("sp", "tr"):
        msg = f"UniProt FASTA header {header!r} has no GN= field: cannot tell which gene it encodes"
        raise InputError(msg)
    m = _ENS_SYMBOL.search(h)
    if m:
        return m.group(1), first
    if "|" in first:
        gene, iso = first.split("|", 1)
        if not gene:
            msg = f"FASTA header {header!r}: empty gene symbol before '|'"
            raise InputError(msg)
        return gene, iso or first
    return first, first


def read_fasta(path: str | Path) -> list[FastaRecord]:
    """Records of a protein FASTA file, in file order (headers parsed by :func:`parse_fasta_header`)."""
    path = Path(path)
    if not path.is_file():
        msg = f"FASTA file {path} does not exist"
        raise InputError(msg)
    records: list[FastaRecord] = []
    header: str | None = None
    chunks: list[str] = []

    def flush() -> None:
        if header is None:
            return
        seq = "".join(chunks).upper().rstrip("*")
        if not seq:
            msg = f"{path}: FASTA record {header!r} has an empty sequence"
            raise InputError(msg)
        gene, iso = parse_fasta_header(header)
        records.append(FastaRecord(gene, iso, seq))

    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            if line.startswith(">"):
                flush()
                header, chunks = line, []
            else:
                if header is None:
                    msg = f"{path}, line {lineno}: sequence data before the first '>' header"
                    raise InputError(msg)
                chunks.append("".join(line.split()))
    flush()
    if not records:
        msg = f"{path}: no FASTA records found (expected lines starting with '>')"
        raise InputError(msg)
    return records


# --------------------------------------------------------------------------------------- pooling


def pool_residues(
    hidden: torch.Tensor, attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor
) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the residue tokens of each sequence -> (B, D).

    A token counts when ``attention_mask == 1`` (not padding) and ``special_tokens_mask == 0``
    (not ``<cls>``/``<eos>``). The sum is taken in float32 whatever the input dtype (precision
    choice: bf16 sums over ~1,000 residues lose about three significant digits).
    """
    import torch

    keep = (attention_mask.bool() & ~special_tokens_mask.bool()).to(torch.float32)  # (B, T)
    n = keep.sum(dim=1, keepdim=True)  # (B, 1)
    if bool((n == 0).any()):
        msg = "a sequence has no residue tokens left after removing special tokens and padding"
        raise InputError(msg)
    return (hidden.float() * keep[:, :, None]).sum(dim=1) / n  # (B, D)


def pool_isoforms(genes: Sequence[str], vectors: np.ndarray) -> GeneTable:
    """Average isoform vectors (N, D) by gene -> a :class:`GeneTable` in first-appearance order.

    Every isoform weighs the same (unweighted mean, float64 accumulation, float32 result).
    """
    if len(genes) != vectors.shape[0]:
        msg = f"{len(genes)} gene labels for {vectors.shape[0]} isoform vectors"
        raise InputError(msg)
    order: dict[str, int] = {}
    for g in genes:
        order.setdefault(g, len(order))
    idx = np.fromiter((order[g] for g in genes), dtype=np.int64, count=len(genes))
    sums = np.zeros((len(order), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, idx, vectors.astype(np.float64))
    counts = np.bincount(idx, minlength=len(order)).astype(np.float64)
    return GeneTable(list(order), (sums / counts[:, None]).astype(np.float32))


def embed_fasta(
    fasta: str | Path,
    model_dir: str | Path,
    *,
    batch_size: int = 8,
    max_residues: int = 1022,
    device: str = "auto",
    layer: int = -1,
    progress: Callable[[int, int], None] | None = None,
) -> GeneTable:
    """Embed every gene of a protein FASTA with a local ESM-2 checkpoint (see the module doc).

    ``model_dir`` holds a ``transformers`` ESM checkpoint (``config.json``, weights, ``vocab.txt``).
    Sequences are processed longest first in batches of ``batch_size`` (less padding per
    batch); ``layer`` picks the hidden state (-1 = the last layer, as published). Inference
    runs in float32 under ``torch.no_grad``. ``progress(done, total)`` is called after each batch.
    """
    import torch

    try:
        from transformers import EsmModel, EsmTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        msg = "celltwin genes embed needs the 'transformers' package: pip install 'celltwin[models]'"
        raise ConfigError(msg) from e
    if batch_size < 1 or max_residues < 1:
        msg = f"batch_size and max_residues must be >= 1, got {batch_size} and {max_residues}"
        raise ConfigError(msg)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        msg = f"ESM model directory {model_dir} has no config.json (expected a local transformers checkpoint)"
        raise InputError(msg)
    records = read_fasta(fasta)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load reports / weight-loading bars on the user's terminal
    hf_logging.disable_progress_bar()
    tokenizer = EsmTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = EsmModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
    model.to(dev).eval()
    order = sorted(range(len(records)), key=lambda i: -len(records[i].sequence))
    out = np.empty((len(records), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            seqs = [records[i].sequence[:max_residues] for i in ids]
            enc = tokenizer(seqs, padding=True, return_tensors="pt", return_special_tokens_mask=True)
            res = model(
                input_ids=enc["input_ids"].to(dev),
                attention_mask=enc["attention_mask"].to(dev),
                output_hidden_states=layer != -1,
            )
            hidden = res.last_hidden_state if layer == -1 else res.hidden_states[layer]  # (B, T, D)
            pooled = pool_residues(hidden, enc["attention_mask"].to(dev), enc["special_tokens_mask"].to(dev))
            out[ids] = pooled.cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return pool_isoforms([r.gene for r in records], out)


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


def _read_gene_list(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


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
        genes = _read_gene_list(Path(gene_list))
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

    A thin adapter over :class:`celltwin.data.gene_ids.GeneTable` (the project's one HGNC
    lookup; its rules, first hit wins: Ensembl ID without version, approved symbol exact, then
    case-insensitive, previous symbol, alias). A name that several genes claim at the first
    matching rule is ambiguous and is not resolved.
    """

    def __init__(self, table) -> None:  # table: celltwin.data.gene_ids.GeneTable
        self.table = table

    @classmethod
    def from_tsv(cls, path: str | Path) -> HgncIndex:
        """Read an HGNC export (``Approved symbol``, ``Ensembl gene ID``, ``Alias symbol``, ...)."""
        from celltwin.data.gene_ids import GeneTable as HgncTable

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
