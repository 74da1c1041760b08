"""``evaluate_2026``: score a submission against a VCC 2026 reference, context by context.

Reading. Both sides are read lazily (:class:`celltwin.data.source.H5adSource` for a path,
:class:`~celltwin.data.source.MemorySource` for an AnnData): obs first, then one context at a time,
its rows as a CSR matrix (a dense-stored file is read in row blocks converted to CSR), so memory
holds one context of each side and never a dense cells x genes matrix.

Checks, all before any metric is computed (each a one-line :class:`~celltwin.errors.InputError`):

* the perturbation column (and the context column when given) exists on both sides;
* the prediction's genes are the reference's, in the same order (unknown and missing genes named);
* the prediction has every context of the reference and no other;
* per context, the prediction has every perturbation of the reference and no other, and the
  reference has control cells. The prediction's own control rows are optional and never read: the
  reference's control cells are the origin of both sides (``control_source: real``; an upload
  carries no controls, the platform adds the reference's before scoring);
* the 2026 counts rule on every predicted cell (non-negative, integral, finite, cell totals at most
  1e6; ``check_counts``), read in row blocks so a bad file fails in seconds; and on the reference.

Scoring. Each context is scored on its own: its scale (``b``, ``r``) comes from the bundle or is
built (:func:`~celltwin.eval.v2026._bundle.build_context_scale`), the submission's metrics ``u``
from ``score_context`` with the context's prepared reference statistics, then ``s`` and the context
score (:mod:`celltwin.eval.v2026._scale`). The overall score is the equal-weight mean of the
context scores (the competition averages its contexts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026 import _bundle as B
from celltwin.eval.v2026 import _scale as S

__all__ = ["OUTPUT_NAMES", "V2026Evaluation", "evaluate_2026", "load_context", "write_baseline"]

logger = logging.getLogger(__name__)

#: Files :meth:`V2026Evaluation.write` writes (an earlier run's copy it does not write is dropped).
OUTPUT_NAMES = frozenset({"results.csv", "agg_results.csv", "score.json", "replicate_splits.csv"})
_BLOCK = 8192


@dataclass
class V2026Evaluation:
    """Outcome of :func:`evaluate_2026`.

    ``per_pert``: context -> the submission's per-perturbation table (``score_context``'s);
    ``metrics``: one row per (context, metric) with ``u`` (submission), ``b`` (baseline), ``r``
    (replicate) and ``s`` (scaled); ``context_scores``: context -> mean of its six ``s``;
    ``score``: the mean of the context scores. Without a context column the single context is
    ``None``.
    """

    per_pert: dict[str | None, Any]
    metrics: Any
    context_scores: dict[str | None, float]
    score: float
    scales: dict[str | None, B.ContextScale] = field(default_factory=dict, repr=False)
    context_col: str | None = None
    bundle: Path | None = None
    bundle_reused: bool = False

    def results(self) -> Any:
        """All per-perturbation tables in one DataFrame (with a ``context`` column when there are contexts)."""
        import pandas as pd

        frames = []
        for ctx, t in self.per_pert.items():
            t = t.reset_index() if "perturbation" not in t.columns else t.copy()
            if self.context_col is not None:
                t.insert(0, "context", ctx)
            frames.append(t)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def splits(self) -> Any:
        import pandas as pd

        rows = []
        for ctx, sc in self.scales.items():
            for row in sc.splits:
                rows.append({"context": ctx, **row} if self.context_col is not None else dict(row))
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        ctx = {str(k): v for k, v in self.context_scores.items()} if self.context_col is not None else None
        return {
            "profile": "vcc2026",
            "score": self.score,
            "context_scores": ctx,
            "context_col": self.context_col,
            "metrics": list(S.METRICS),
            "bundle": None if self.bundle is None else str(self.bundle),
            "bundle_reused": self.bundle_reused,
        }

    def write(self, outdir: str | os.PathLike[str]) -> list[Path]:
        """Write ``results.csv`` (per perturbation), ``agg_results.csv`` (u, b, r, s per context and
        metric), ``replicate_splits.csv`` (the replicate's per-split values) and ``score.json``,
        all at once (:func:`celltwin._io.atomic_dir`). Returns the paths."""
        from celltwin._io import atomic_dir

        final = Path(outdir)
        names = ["results.csv", "agg_results.csv", "replicate_splits.csv", "score.json"]
        with atomic_dir(final, owned=OUTPUT_NAMES) as stage:
            st = Path(stage)
            self.results().to_csv(st / "results.csv", index=False)
            agg = self.metrics.copy()
            if self.context_col is None:
                agg = agg.drop(columns=["context"])
            agg.to_csv(st / "agg_results.csv", index=False)
            self.splits().to_csv(st / "replicate_splits.csv", index=False)
            (st / "score.json").write_text(json.dumps(_finite_json(self.summary()), indent=1) + "\n")
        return [final / n for n in names]


def _finite_json(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# reading


def _source(data: Any, what: str) -> Any:
    from celltwin.data.source import open_source

    if isinstance(data, str | os.PathLike) and not os.path.exists(data):
        msg = f"{what} {data}: file not found"
        raise InputError(msg)
    return open_source(data)


def _column(src: Any, col: str, what: str) -> np.ndarray:
    if col not in src.obs.columns:
        have = ", ".join(map(str, list(src.obs.columns)[:10])) or "(none)"
        msg = f"{what} {src.name}: obs has no column {col!r} (columns: {have})"
        raise InputError(msg)
    values = src.obs[col]
    if values.isna().any():
        msg = f"{what} {src.name}: obs[{col!r}] has {int(values.isna().sum())} missing value(s)"
        raise InputError(msg)
    return values.astype(str).to_numpy()


def load_context(src: Any, rows: np.ndarray, labels: np.ndarray) -> Any:
    """One context of ``src`` (its sorted row indices ``rows``) as a ContextCounts (CSR)."""
    rows = np.asarray(rows, dtype=np.int64)
    fmt = getattr(src, "x_format", "csr")
    if fmt == "csr":
        X = src.read_stored(rows)
        X = sp.csr_matrix(X)
    else:  # dense / CSC: row blocks converted to CSR
        blocks = [sp.csr_matrix(src.read_stored(rows[i : i + _BLOCK])) for i in range(0, rows.size, _BLOCK)]
        X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, src.n_vars))
    return S.ContextCounts(X=X, perts=np.asarray(labels)[rows], genes=[str(g) for g in src.var_names])


def _check_counts_rows(X: Any, src: Any, rows: np.ndarray, where: str) -> None:
    """The 2026 counts rule on ``X`` (the cells ``rows`` of ``src``); the offending cell is named
    by its row and obs name in the file."""
    try:
        S.check_counts(X, where)
    except InputError as e:
        msg = str(e)
        m = re.search(r"\brow (\d+)", msg)
        if m is None:
            raise
        k = int(rows[int(m.group(1))])
        cell = f"cell {k} ({str(src.obs.index[k])!r})"
        raise InputError(msg[: m.start()] + cell + msg[m.end() :]) from None


def _check_counts_blocks(src: Any, rows: np.ndarray, where: str) -> None:
    """The 2026 counts rule over ``rows`` of ``src``, block by block."""
    for i in range(0, rows.size, _BLOCK):
        blk = rows[i : i + _BLOCK]
        _check_counts_rows(sp.csr_matrix(src.read_stored(blk)), src, blk, where)


def _check_genes(real: Any, pred: Any) -> None:
    rg = [str(g) for g in real.var_names]
    pg = [str(g) for g in pred.var_names]
    if rg == pg:
        return
    rs, ps = set(rg), set(pg)
    if len(ps) != len(pg):
        dup = sorted({g for g in pg if pg.count(g) > 1})[:5]
        msg = f"prediction {pred.name}: duplicated gene name(s) {dup}"
        raise InputError(msg)
    unknown = [g for g in pg if g not in rs]
    if unknown:
        msg = (
            f"prediction {pred.name}: {len(unknown)} gene(s) not in the reference {real.name} "
            f"(e.g. {unknown[:5]}); the gene axis must be the reference's exactly"
        )
        raise InputError(msg)
    missing = [g for g in rg if g not in ps]
    if missing:
        msg = (
            f"prediction {pred.name}: {len(missing)} gene(s) of the reference are missing "
            f"(e.g. {missing[:5]}); the gene axis must be the reference's exactly"
        )
        raise InputError(msg)
    k = next(i for i, (a, b) in enumerate(zip(rg, pg, strict=True)) if a != b)
    msg = (
        f"prediction {pred.name}: genes are the reference's but in another order (position {k}: "
        f"{pg[k]!r}, reference {rg[k]!r}); write them in the reference's order"
    )
    raise InputError(msg)


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate_2026(
    pred: Any,
    real: Any,
    *,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    context_col: str | None = None,
    bundle: str | os.PathLike[str] | None = None,
    config: Any = None,
    targets: Mapping[str, Any] | None = None,
    n_splits: int = S.N_SPLITS,
    base_seed: int = S.BASE_SEED,
    validate: bool = True,
    write_baseline_to: str | os.PathLike[str] | None = None,
) -> V2026Evaluation:
    """Score ``pred`` against ``real`` (AnnData or ``.h5ad`` paths) with the VCC 2026 metrics.

    ``context_col``: obs column of the cellular context; every context is scored on its own scale
    and the score is the mean of the context scores (``None``: one context). ``bundle``: a
    directory caching each context's scale (:mod:`celltwin.eval.v2026._bundle`): built when
    absent, reused when it matches this reference and configuration, refused otherwise.
    ``config``: the metric parameters (``V2026Config``; default the competition's). ``targets``:
    passed to the metrics (label -> target gene, when labels are not gene symbols).
    ``validate=False`` skips the integral-counts rule on the prediction (used to score the
    fractional baseline itself). ``write_baseline_to``: also write the baseline prediction of every
    context to this ``.h5ad``.
    """
    if config is None:
        config = S.default_config()
    real_src = _source(real, "reference")
    pred_src = _source(pred, "prediction")
    real_labels = _column(real_src, pert_col, "reference")
    pred_labels = _column(pred_src, pert_col, "prediction")
    if context_col is not None:
        real_ctx = _column(real_src, context_col, "reference")
        pred_ctx = _column(pred_src, context_col, "prediction")
        contexts: list[str | None] = sorted(set(real_ctx.tolist()))
        missing = sorted(set(contexts) - set(pred_ctx.tolist()))
        if missing:
            msg = f"prediction {pred_src.name}: context(s) {missing} of the reference have no predicted cells"
            raise InputError(msg)
        extra = sorted(set(pred_ctx.tolist()) - set(contexts))
        if extra:
            msg = f"prediction {pred_src.name}: context(s) {extra} are not in the reference {real_src.name}"
            raise InputError(msg)
        real_rows = {c: np.flatnonzero(real_ctx == c) for c in contexts}
        pred_rows = {c: np.flatnonzero(pred_ctx == c) for c in contexts}
    else:
        contexts = [None]
        real_rows = {None: np.arange(real_src.n_obs)}
        pred_rows = {None: np.arange(pred_src.n_obs)}
    _check_genes(real_src, pred_src)

    for c in contexts:
        where = "" if c is None else f" context {c!r}"
        rl = set(real_labels[real_rows[c]].tolist())
        pl_ = set(pred_labels[pred_rows[c]].tolist())
        if control_pert not in rl:
            msg = f"reference {real_src.name}{where}: no cells of the control {control_pert!r}"
            raise InputError(msg)
        absent = sorted(rl - pl_ - {control_pert})
        if absent:
            msg = (
                f"prediction {pred_src.name}{where}: {len(absent)} perturbation(s) of the reference have "
                f"no predicted cells (e.g. {absent[:5]})"
            )
            raise InputError(msg)
        unknown = sorted(pl_ - rl)
        if unknown:
            msg = (
                f"prediction {pred_src.name}{where}: {len(unknown)} perturbation(s) not in the reference "
                f"(e.g. {unknown[:5]})"
            )
            raise InputError(msg)
    if validate:
        for c in contexts:
            where = f"prediction {pred_src.name}" + ("" if c is None else f" context {c!r}")
            _check_counts_blocks(pred_src, pred_rows[c], where)

    identity = B.config_identity(
        config, control=control_pert, targets=targets, base_seed=base_seed, n_splits=n_splits
    )
    store = B.ReferenceBundle.open(bundle) if bundle is not None else None
    if store is not None:
        store.check_identity(identity, contexts)
    per_pert: dict[str | None, Any] = {}
    rows: list[dict[str, Any]] = []
    ctx_scores: dict[str | None, float] = {}
    scales: dict[str | None, B.ContextScale] = {}
    writer: B.BundleWriter | None = None
    baseline_writer: _BaselineWriter | None = None
    try:
        if bundle is not None and store is None:
            writer = B.BundleWriter(
                bundle, identity, extra={"pert_col": pert_col, "context_col": context_col}
            )
        if write_baseline_to is not None:
            baseline_writer = _BaselineWriter(write_baseline_to, real_src, pert_col, context_col)
        for c in contexts:
            where = "" if c is None else f"context {c!r}: "
            real_cc = load_context(real_src, real_rows[c], real_labels)
            _check_counts_rows(
                real_cc.X,
                real_src,
                real_rows[c],
                f"reference {real_src.name}" + ("" if c is None else f" context {c!r}"),
            )
            digest = B.context_digest(real_cc, c)
            order = S.group_order(real_src.obs[pert_col].iloc[real_rows[c]])
            if store is not None:
                store.check_context(c, digest)
                sc = store.load(c, real=real_cc)
            else:
                logger.info("%sbuilding the reference scale (baseline and %d split halves)", where, n_splits)
                sc = B.build_context_scale(
                    real_cc,
                    context=c,
                    control=control_pert,
                    targets=targets,
                    config=config,
                    base_seed=base_seed,
                    n_splits=n_splits,
                    order=order,
                    digest=digest,
                )
                if writer is not None:
                    writer.add(sc)
            if sc.real_stats is None:
                sc.real_stats = S.prepare_real(real_cc, control=control_pert, targets=targets, config=config)
            if baseline_writer is not None:
                baseline_writer.add(
                    c, S.build_baseline(real_cc, control=control_pert, targets=targets), real_rows[c]
                )
            pred_cc = load_context(pred_src, pred_rows[c], pred_labels)
            res = S.score_context(
                real_cc,
                pred_cc,
                control=control_pert,
                targets=targets,
                config=config,
                real_stats=sc.real_stats,
            )
            u = {m: float(res.agg.get(m, math.nan)) for m in S.METRICS}
            try:
                s = S.scale(u, sc.b, sc.r)
            except S.ScaleError as e:
                raise S.ScaleError(f"{where}{e}") from None
            ctx_scores[c] = S.context_score(s)
            per_pert[c] = res.per_pert
            for m in S.METRICS:
                rows.append({"context": c, "metric": m, "u": u[m], "b": sc.b[m], "r": sc.r[m], "s": s[m]})
            sc.real_stats = None  # drop the big prepared statistics once the context is scored
            scales[c] = sc
            del real_cc, pred_cc
        if writer is not None:
            writer.commit()
        if baseline_writer is not None:
            baseline_writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        if baseline_writer is not None:
            baseline_writer.abort()
        raise
    finally:
        for src in (real_src, pred_src):
            if src is not real and src is not pred:
                src.close()

    import pandas as pd

    metrics = pd.DataFrame(rows, columns=["context", "metric", "u", "b", "r", "s"])
    score = float(np.mean([ctx_scores[c] for c in contexts]))
    return V2026Evaluation(
        per_pert=per_pert,
        metrics=metrics,
        context_scores=ctx_scores,
        score=score,
        scales=scales,
        context_col=context_col,
        bundle=None if bundle is None else Path(bundle),
        bundle_reused=store is not None,
    )


# ---------------------------------------------------------------------------------------------
# the baseline as a file


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
    if context_col is not None:
        ctx = _column(src, context_col, "reference")
        contexts: list[str | None] = sorted(set(ctx.tolist()))
        rows = {c: np.flatnonzero(ctx == c) for c in contexts}
    else:
        contexts, rows = [None], {None: np.arange(src.n_obs)}
    w = _BaselineWriter(path, src, pert_col, context_col)
    try:
        for c in contexts:
            cc = load_context(src, rows[c], labels)
            if control_pert not in set(np.asarray(cc.perts).tolist()):
                where = "" if c is None else f" context {c!r}"
                msg = f"reference {src.name}{where}: no cells of the control {control_pert!r}"
                raise InputError(msg)
            w.add(c, S.build_baseline(cc, control=control_pert, targets=targets), rows[c])
        w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        if src is not real:
            src.close()
    return Path(path)
