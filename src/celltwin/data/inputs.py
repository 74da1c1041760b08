"""What a run reads as input and what it predicts: genes, highly variable genes or an obsm matrix.

The three choices mirror arc-state's ``embed_key`` / ``output_space`` (``--hvg``, ``--embed-key``,
``--output-space`` of ``celltwin train``):

==================  ===================================  =========================================
input               ``output_space`` (default first)     what ``celltwin predict`` writes
==================  ===================================  =========================================
every gene of X     ``gene``                             every gene
``--hvg N``         ``all`` (VCC setting), ``gene``      every gene / the N HVGs
``--embed-key K``   ``all``, ``embedding``               every gene / the embedding (X = K's dims)
==================  ===================================  =========================================

Why ``all`` is the default with ``--hvg`` and ``--embed-key``: the VCC scores every gene, so a
run's default output should be ready for ``celltwin eval`` on the full panel. Baselines are
gene-space models: they accept ``--hvg`` (with ``gene`` they predict the HVGs only; with ``all``
the HVGs are not needed and every gene is used), not ``--embed-key``.

Fitting (:func:`fit_inputs`) is streamed: the median library size and the seurat_v3 HVG
statistics are accumulated over the training rows block by block.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

__all__ = ["OUTPUT_SPACES", "FittedInputs", "InputConfig", "file_fingerprint", "fit_inputs", "load_inputs"]

OUTPUT_SPACES = ("gene", "all", "embedding")
_INPUT_GENES = "input_genes.txt"
_FP_CHUNK = 1 << 20  # bytes hashed at each end of a file by file_fingerprint
_BASELINE_MODELS = ("control", "cell-mean", "perturbation-mean", "context-transfer", "scaled-context-transfer",
                    "linear", "additive")


@dataclass(frozen=True)
class InputConfig:
    """Input / output choice of a run (see the module docstring); validated once."""

    hvg: int | None = None  # select this many seurat_v3 HVGs of the training cells as input genes
    embed_key: str | None = None  # read the input from obsm[embed_key]
    output_space: str = ""  # gene | all | embedding; "" = the default of the input (module docstring)
    hvg_batch_key: str | None = None  # obs column for batch-aware HVG ranks (None = one batch)

    def __post_init__(self) -> None:
        if self.hvg is not None and self.hvg < 1:
            msg = f"--hvg: expected a positive number of genes, got {self.hvg}"
            raise ConfigError(msg)
        if self.hvg is not None and self.embed_key:
            msg = "--hvg and --embed-key: give one input (HVG genes of X, or an obsm matrix), not both"
            raise ConfigError(msg)
        if self.output_space and self.output_space not in OUTPUT_SPACES:
            msg = f"--output-space: expected one of {', '.join(OUTPUT_SPACES)}, got {self.output_space!r}"
            raise ConfigError(msg)
        if self.output_space == "embedding" and not self.embed_key:
            msg = "--output-space embedding: needs --embed-key (predict the embedding of an obsm matrix)"
            raise ConfigError(msg)
        if self.output_space == "gene" and self.embed_key:
            msg = "--output-space gene: with --embed-key use 'all' (decode every gene) or 'embedding'"
            raise ConfigError(msg)

    def resolved_output(self) -> str:
        if self.output_space:
            return self.output_space
        return "all" if (self.hvg is not None or self.embed_key) else "gene"


@dataclass
class FittedInputs:
    """The fitted preprocessing plus the input genes / key of a run."""

    preprocess: Any  # celltwin.data.preprocess.Preprocessing (genes = output genes)
    input_genes: list[str] | None  # None = the output genes
    embed_key: str | None
    output_space: str
    embed_dim: int = 0
    fingerprint: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        kind = "obsm" if self.embed_key else "genes"
        return {"kind": kind, "embed_key": self.embed_key, "output_space": self.output_space,
                "n_input_genes": None if self.input_genes is None else len(self.input_genes),
                "embed_dim": self.embed_dim}

    def save(self, run_dir: str | os.PathLike[str]) -> None:
        if self.input_genes is not None:
            from celltwin.data.preprocess import write_genes_txt

            write_genes_txt(Path(run_dir) / _INPUT_GENES, self.input_genes)
        with atomic_path(Path(run_dir) / "inputs.json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_inputs(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"input_genes": list | None, "embed_key": str | None, "output_space": str, ...}`` of a run.

    Runs written before inputs were recorded read as "every gene in, every gene out".
    """
    d = Path(run_dir)
    p = d / "inputs.json"
    info: dict[str, Any] = {"kind": "genes", "embed_key": None, "output_space": "gene", "embed_dim": 0}
    if p.exists():
        try:
            info.update(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            msg = f"{p}: not valid JSON ({e})"
            raise InputError(msg) from None
    info["input_genes"] = None
    if (d / _INPUT_GENES).exists():
        from celltwin.data.preprocess import read_genes_txt

        info["input_genes"] = read_genes_txt(d / _INPUT_GENES)
    return info


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "blake2b"}`` of a file: cheap enough for multi-GB ``.h5ad`` files.

    The hash is BLAKE2b-128 over the file size and its first and last 1 MiB (the whole file
    when smaller than 2 MiB): O(1) time whatever the size, and it changes when the file is
    replaced by another dataset (HDF5 headers and the obs/var tables at the ends differ). An
    in-place edit of the middle alone with the same size is only caught by ``mtime_ns``,
    which is why it is part of the fingerprint; the price is that merely copying or touching
    the file also counts as a change (resume then asks to start fresh). The path itself is
    not included, so a moved file (``mv`` keeps the mtime) still matches.
    """
    p = Path(path)
    try:
        st = p.stat()
        h = hashlib.blake2b(digest_size=16)
        h.update(str(st.st_size).encode())
        with p.open("rb") as f:
            if st.st_size <= 2 * _FP_CHUNK:
                h.update(f.read())
            else:
                h.update(f.read(_FP_CHUNK))
                f.seek(st.st_size - _FP_CHUNK)
                h.update(f.read(_FP_CHUNK))
    except OSError as e:
        msg = f"{p}: cannot fingerprint the file ({e.strerror or e})"
        raise InputError(msg) from None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "blake2b": h.hexdigest()}


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def fit_inputs(data, rows: np.ndarray, config: InputConfig, model: str = "") -> FittedInputs:
    """Fit the run's preprocessing on the training ``rows`` of ``data`` (a CellDataset), streamed."""
    from celltwin.data.preprocess import fit_preprocessing

    output = config.resolved_output()
    if output == "all" and config.hvg is None and not config.embed_key:
        output = "gene"  # every gene in: "all" and "gene" are the same genes (no decoder needed)
    if model in _BASELINE_MODELS and config.embed_key:
        msg = f"--embed-key: model {model} is a gene-space baseline; it reads X (use --hvg or nothing)"
        raise ConfigError(msg)
    if model == "state-se" and (config.embed_key or config.hvg is not None):
        msg = "--model state-se: its input is the run's SE embedding; --embed-key / --hvg do not apply"
        raise ConfigError(msg)
    hvg_genes: list[str] | None = None
    if config.hvg is not None:
        if config.hvg >= data.n_vars:
            msg = f"--hvg {config.hvg}: the data has only {data.n_vars} genes"
            raise ConfigError(msg)
        from celltwin.data.hvg import highly_variable_genes, select_hvg

        table = highly_variable_genes(data, config.hvg, batch_key=config.hvg_batch_key, rows=rows)
        hvg_genes = select_hvg(table)
    out_genes = hvg_genes if (hvg_genes is not None and output == "gene") else None
    pre = fit_preprocessing(data, rows=rows, genes=out_genes)
    if hvg_genes is not None:
        pre.hvg = {"flavor": "seurat_v3", "n_top_genes": int(config.hvg), "batch_key": config.hvg_batch_key}
    input_genes = hvg_genes if (hvg_genes is not None and output == "all") else None
    embed_dim = 0
    if config.embed_key:
        if config.embed_key not in data.obsm_keys():
            avail = ", ".join(data.obsm_keys()) or "(none)"
            msg = f"{data.name}: --embed-key {config.embed_key!r} not in obsm of every file; available: {avail}"
            raise InputError(msg)
        probe = data.read_rows(rows[:1], obsm_key=config.embed_key)
        embed_dim = int(probe.shape[1])
    if model in _BASELINE_MODELS and output == "all":
        input_genes = None  # baselines predict every gene directly; the HVGs are not needed
    files = [file_fingerprint(f) for f in data.files if Path(f).exists()]
    fp = {"files": files, "n_rows": int(rows.size), "rows_blake2b": _rows_digest(rows),
          "preprocess": pre.to_dict(), "genes": len(pre.genes),
          "input": {"hvg": config.hvg, "embed_key": config.embed_key, "output_space": output,
                    "input_genes": None if input_genes is None else hashlib.blake2b(
                        "\n".join(input_genes).encode(), digest_size=16).hexdigest()}}
    return FittedInputs(pre, input_genes, config.embed_key, output, embed_dim, fp)
