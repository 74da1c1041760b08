"""Gene embeddings from protein sequences: a protein FASTA through a local ESM-2 checkpoint.

Every protein isoform of a gene is run through an ESM-2 checkpoint read from a *local* directory
(``transformers`` ``EsmModel`` + ``EsmTokenizer``; nothing is fetched from a hub; torch and
transformers come with the optional extra ``pip install 'celltwin[genes]'``). Each isoform's
vector is the mean of the last hidden layer over its residues (the ``<cls>``/``<eos>`` special
tokens and padding are excluded, :func:`pool_residues`); a gene's vector is the unweighted mean of
its isoforms' vectors (:func:`pool_isoforms`). Sequences longer than ``max_residues`` are
truncated to their first ``max_residues`` residues (ESM-2 was trained on crops of 1,022). The
result is a :class:`celltwin.genes.GeneTable` (``celltwin genes embed`` writes it).

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

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from celltwin.errors import ConfigError, InputError
from celltwin.genes import GeneTable

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FastaRecord",
    "embed_fasta",
    "parse_fasta_header",
    "pool_isoforms",
    "pool_residues",
    "read_fasta",
]


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


GENES_EXTRA_HINT = "pip install 'celltwin[genes]'"


def _import_esm():
    """``(torch, EsmModel, EsmTokenizer)``, or a one-line ConfigError naming the ``genes`` extra.

    torch and transformers are optional (the ``genes`` extra); a package that is absent and one
    that is present but fails to import (e.g. a transformers too old or too new for the installed
    torch) are told apart, and the cause is named either way.
    """
    try:
        import torch
        from transformers import EsmModel, EsmTokenizer
    except (ImportError, RuntimeError) as e:  # transformers' lazy modules wrap import failures in RuntimeError
        name = (getattr(e, "name", None) or "").split(".")[0]
        if isinstance(e, ModuleNotFoundError) and name in ("torch", "transformers"):
            msg = (f"ESM-2 gene embeddings need the optional package '{name}', which is not installed: "
                   f"{GENES_EXTRA_HINT}")
        else:
            msg = (f"ESM-2 gene embeddings need torch and transformers, and importing them failed "
                   f"({type(e).__name__}: {e}); reinstall matching versions: pip install -U 'celltwin[genes]'")
        raise ConfigError(msg) from e
    return torch, EsmModel, EsmTokenizer


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
    torch, EsmModel, EsmTokenizer = _import_esm()
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
