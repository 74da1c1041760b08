"""The VCC 2026 mean-perturbation baseline prediction as an ``.h5ad`` (``eval --write-baseline``):
every context's baseline (:mod:`._baseline`) streamed into one file, written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026._baseline import build_baseline
from celltwin.eval.v2026._read import _column, _context_rows, _source, load_context

__all__ = ["write_baseline"]


class _BaselineWriter:
    """Streams the baseline prediction of each context into one ``.h5ad`` (CSR, float32)."""

    def __init__(
        self, path: str | os.PathLike[str], real_src: Any, pert_col: str, context_col: str | None
    ) -> None:
        from celltwin._io import atomic_path

        self.path = Path(path)
        self.real_src = real_src
        self.pert_col = pert_col
        self.context_col = context_col
        self._cm = atomic_path(self.path, suffix=".h5ad")
        self.tmp = Path(self._cm.__enter__())
        self._parts: list[Path] = []
        self._labels: list[np.ndarray] = []
        self._names: list[np.ndarray] = []
        self._ctx: list[Any] = []
        self._open = True

    def add(self, context: str | None, cc: Any, rows: np.ndarray) -> None:
        """The baseline ``cc`` of ``context`` (its cells: the reference's ``rows``, in order)."""
        part = self.tmp.with_name(self.tmp.name + f".part{len(self._parts)}.npz")
        sp.save_npz(part, sp.csr_matrix(cc.X), compressed=False)
        self._parts.append(part)
        self._labels.append(np.asarray(cc.perts).astype(str))
        self._names.append(np.asarray(self.real_src.obs.index[rows]).astype(str))
        self._ctx.append(context)

    def commit(self) -> None:
        import anndata as ad
        import h5py
        import pandas as pd

        labels = np.concatenate(self._labels) if self._labels else np.empty(0, dtype=str)
        cols: dict[str, Any] = {self.pert_col: pd.Categorical(labels)}
        if self.context_col is not None:
            ctx = np.concatenate(
                [np.full(lab.size, c, dtype=object) for lab, c in zip(self._labels, self._ctx, strict=True)]
            )
            cols[self.context_col] = pd.Categorical(ctx.astype(str))
        names = np.concatenate(self._names) if self._names else np.empty(0, dtype=str)
        obs = pd.DataFrame(cols, index=pd.Index(names))
        var = pd.DataFrame(index=pd.Index([str(g) for g in self.real_src.var_names]))
        try:
            with h5py.File(self.tmp, "w") as f:
                first = True
                for part in self._parts:
                    m = sp.load_npz(part).tocsr()
                    if first:
                        ad.io.write_elem(f, "X", m)
                        first = False
                    else:
                        ad.io.sparse_dataset(f["X"]).append(m)
                if first:
                    ad.io.write_elem(f, "X", sp.csr_matrix((0, len(var)), dtype=np.float32))
                ad.io.write_elem(f, "obs", obs)
                ad.io.write_elem(f, "var", var)
                ad.io.write_elem(f, "obsm", {})
                ad.io.write_elem(f, "varm", {})
                ad.io.write_elem(f, "obsp", {})
                ad.io.write_elem(f, "varp", {})
                ad.io.write_elem(f, "layers", {})
                ad.io.write_elem(f, "uns", {"celltwin": {"kind": "vcc2026 mean-perturbation baseline"}})
                f.attrs["encoding-type"] = "anndata"
                f.attrs["encoding-version"] = "0.1.0"
        finally:
            self._cleanup()
        self._open = False
        self._cm.__exit__(None, None, None)

    def _cleanup(self) -> None:
        for p in self._parts:
            p.unlink(missing_ok=True)

    def abort(self) -> None:
        if self._open:
            self._open = False
            self._cleanup()
            err = RuntimeError("aborted")
            try:
                self._cm.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass


def write_baseline(
    real: Any,
    path: str | os.PathLike[str],
    *,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    context_col: str | None = None,
    targets: Mapping[str, Any] | None = None,
) -> Path:
    """Write the mean-perturbation baseline prediction of every context of ``real`` to ``path``."""
    src = _source(real, "reference")
    labels = _column(src, pert_col, "reference")
    contexts, rows = _context_rows(src, context_col, "reference")
    w = _BaselineWriter(path, src, pert_col, context_col)
    try:
        for c in contexts:
            cc = load_context(src, rows[c], labels)
            if control_pert not in set(np.asarray(cc.perts).tolist()):
                where = "" if c is None else f" context {c!r}"
                msg = f"reference {src.name}{where}: no cells of the control {control_pert!r}"
                raise InputError(msg)
            w.add(c, build_baseline(cc, control=control_pert, targets=targets), rows[c])
        w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        if src is not real:
            src.close()
    return Path(path)
