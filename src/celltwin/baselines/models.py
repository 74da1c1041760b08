"""The baselines: every one predicts a *shift* in model space and adds it to control cells.

All baselines are fitted from an :class:`~celltwin.baselines._effects.EffectTable` (control means
and mean effects of the training pairs, model space = log1p-normalised). For a request
``(perturbation p, context c)`` each returns a shift vector ``delta`` (G,) and a *source* string:
``"model"`` when the baseline's own rule applied, or ``"fallback:cell-mean"`` when it did not know
``p`` (the rule for every baseline is stated below). Predicted cells are
``max(controls + delta, 0)`` cell by cell (clip at 0 because log1p expression is non-negative).

Notation: ``d(c, q)`` the training effect of pair (c, q) (mean of its cells minus the mean of
context c's controls); ``n(c, q)`` its number of cells.

* ``control``: ``delta = 0`` (predicts no effect). Never falls back.
* ``cell-mean``: ``sum_q n(c,q) d(c,q) / sum_q n(c,q)`` over the training pairs of context c: the
  mean shift of all training perturbed cells, added to each control cell (``celltwin predict
  --repeat-mean`` from the same context's controls gives exactly the mean perturbed training cell).
  NOT the VCC baseline (``celltwin baseline``, cell-eval's cell-mean, :func:`celltwin.eval.vcc_baseline`):
  that one gives every predicted cell one vector, the unweighted mean of the groups' mean
  expression with the control group counted as a group, so it scores differently (DE calls, MAE);
  ``celltwin score`` normalises against it. When c has no training
  perturbations (zero-shot) the sum runs over every training pair of every context. Never falls back.
* ``perturbation-mean``: the unweighted mean of ``d(c, q)`` over the training pairs of context c
  (each perturbation counts once); all contexts when c has none. Never falls back.
* ``context-transfer``: the mean of ``d(c', p)`` over the *other* contexts c' != c where p was
  trained, each context weighted equally. Falls back to cell-mean when p was trained in no other
  context.
* ``scaled-context-transfer``: ``alpha_c * transfer(c, p)``, with the scalar ``alpha_c`` fitted by
  least squares without intercept on context c's training pairs q that also have a transfer:
  ``alpha_c = sum_q <d(c,q), t(c,q)> / sum_q <t(c,q), t(c,q)>``. When c has no such pair (zero-shot),
  ``alpha`` is pooled the same way over every context's pairs; 1.0 when there is none at all.
  Falls back to cell-mean exactly when context-transfer does.
* ``linear`` (Ahlmann-Eltze, Huber & Anders 2025): residual effects ``R = d(c,q) - b_c`` with
  ``b_c`` the perturbation-mean shift of c; the gene embedding ``E`` (G, K) is the PCA scores of
  the genes on ``R`` (genes as observations, columns centred, K = ``linear_dim`` capped by the
  rank); a perturbation's embedding is the row of ``E`` of its target gene (sum of rows for
  ``A+B``). ``W`` (K, K) is the ridge solution ``(E'E + l I)^-1 E' R_s P (P'P + l I)^-1`` over the
  training pairs ``s`` whose target genes are measured. Prediction ``b_c + E W e_p``. Falls back to
  cell-mean when a target gene of p is not among the model genes. With no embeddable training
  pair, ``W = 0`` and the prediction is ``b_c``.
* ``additive``: for ``A+B`` the sum ``d(c, A) + d(c, B)`` of the singles' training effects in the
  same context; for a single seen in c its own training effect. Falls back to cell-mean when any
  component was not trained in c.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from celltwin._io import atomic_path
from celltwin.baselines._effects import EffectTable, fit_effect_table
from celltwin.baselines.options import BaselineOptions
from celltwin.data.columns import parse_perturbation
from celltwin.errors import ConfigError, InputError

__all__ = ["BASELINES", "Baseline", "BaselineConfig", "fit_baseline", "fitted_params", "load_baseline"]

BASELINES: tuple[str, ...] = (
    "control",
    "cell-mean",
    "perturbation-mean",
    "context-transfer",
    "scaled-context-transfer",
    "linear",
    "additive",
)
FALLBACK = "fallback:cell-mean"
_NPZ = "baseline.npz"


@dataclass(frozen=True)
class BaselineConfig:
    """A baseline fit: the model name plus its :class:`~celltwin.baselines.options.BaselineOptions`.

    Defaults and checks of the options come from ``BaselineOptions`` (the one place they are defined).
    """

    name: str
    min_cells: int = BaselineOptions.min_cells
    linear_dim: int = BaselineOptions.linear_dim
    linear_ridge: float = BaselineOptions.linear_ridge

    def __post_init__(self) -> None:
        if self.name not in BASELINES:
            msg = f"baseline: model expected one of {', '.join(BASELINES)}, got {self.name!r}"
            raise ConfigError(msg)
        self.options()  # type and value checks

    def options(self) -> BaselineOptions:
        return BaselineOptions(min_cells=self.min_cells, linear_dim=self.linear_dim, linear_ridge=self.linear_ridge)

    @classmethod
    def from_options(cls, name: str, options: BaselineOptions | dict[str, str] | None = None) -> BaselineConfig:
        """From typed options, or ``--set`` strings (unknown keys and bad values raise ConfigError)."""
        if not isinstance(options, BaselineOptions):
            options = BaselineOptions.from_strings(options or {})
        return cls(name=name, **asdict(options))


class Baseline:
    """A fitted baseline: shift rules over an :class:`EffectTable` plus model parameters."""

    def __init__(self, config: BaselineConfig, genes: list[str], table: EffectTable, params: dict[str, np.ndarray]):
        self.config = config
        self.name = config.name
        self.genes = list(genes)
        self.table = table
        self.params = params
        self._gene_index = {g: i for i, g in enumerate(self.genes)}

    # ------------------------------------------------------------------ shifts
    def shift(self, perturbation: str, context: str | None) -> tuple[np.ndarray, str]:
        """Return ``(delta (G,) float64, source)`` for ``perturbation`` in ``context``."""
        t = self.table
        c = t.context_index(context)
        name = self.name
        if name == "control":
            return np.zeros(t.n_genes), "model"
        if name == "cell-mean":
            return t.cell_mean_shift(c)[0], "model"
        if name == "perturbation-mean":
            return t.pert_mean_shift(c)[0], "model"
        if name in ("context-transfer", "scaled-context-transfer"):
            tr = t.transfer(c, perturbation)
            if tr is None:
                return t.cell_mean_shift(c)[0], FALLBACK
            if name == "context-transfer":
                return tr, "model"
            alpha = self.params["alpha"]
            a = float(alpha[c]) if c >= 0 and np.isfinite(alpha[c]) else float(self.params["alpha_pooled"])
            return a * tr, "model"
        if name == "linear":
            parts = parse_perturbation(perturbation)
            if not parts or any(p not in self._gene_index for p in parts):
                return t.cell_mean_shift(c)[0], FALLBACK
            E, W = self.params["embedding"], self.params["W"]
            e = E[[self._gene_index[p] for p in parts]].sum(0)  # (K,)
            return t.pert_mean_shift(c)[0] + E @ (W @ e), "model"
        if name == "additive":
            ks = [t.lookup(c, p) for p in parse_perturbation(perturbation)] if c >= 0 else [-1]
            if not ks or min(ks) < 0:
                return t.cell_mean_shift(c)[0], FALLBACK
            return t.pair_effect[ks].sum(0), "model"
        raise AssertionError(name)  # unreachable: names validated in BaselineConfig

    def describe(self, perturbation: str, context: str | None) -> str:
        """The source of the prediction for this request (``model`` or ``fallback:cell-mean``)."""
        return self.shift(perturbation, context)[1]

    def predict(self, controls: np.ndarray, perturbation: str, context: str | None, rng=None) -> np.ndarray:
        """Predicted cells (n, G) float32: ``max(controls + delta, 0)``; deterministic (rng unused)."""
        delta, _ = self.shift(perturbation, context)
        out = np.asarray(controls, dtype=np.float32) + delta.astype(np.float32)[None, :]
        np.maximum(out, 0, out=out)
        return out

    # ------------------------------------------------------------------ I/O
    def save(self, run_dir: str | Path) -> dict:
        """Write ``baseline.npz`` in ``run_dir``; return fields for run.json."""
        run_dir = Path(run_dir)
        arrays = dict(self.table.to_arrays())
        arrays.update({f"param_{k}": v for k, v in self.params.items()})
        arrays["config_json"] = np.asarray(json.dumps(asdict(self.config)))
        with atomic_path(run_dir / _NPZ) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return {"baseline": asdict(self.config), "n_training_pairs": len(self.table.pair_pert)}


def _scaled_alpha(t: EffectTable) -> tuple[np.ndarray, float]:
    num = np.zeros(len(t.contexts))
    den = np.zeros(len(t.contexts))
    for k in range(len(t.pair_pert)):
        c = int(t.pair_context[k])
        tr = t.transfer(c, t.pair_pert[k])
        if tr is None:
            continue
        num[c] += float(t.pair_effect[k] @ tr)
        den[c] += float(tr @ tr)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    pooled = float(num.sum() / den.sum()) if den.sum() > 0 else 1.0
    return alpha, pooled


def _linear_params(t: EffectTable, genes: list[str], dim: int, ridge: float) -> dict[str, np.ndarray]:
    G = t.n_genes
    P = len(t.pair_pert)
    if P == 0:
        return {"embedding": np.zeros((G, 1)), "W": np.zeros((1, 1))}
    base = np.stack([t.pert_mean_shift(int(c))[0] for c in t.pair_context])  # (P, G)
    R = (t.pair_effect - base).T  # (G, P) residual effects, genes as observations
    Rc = R - R.mean(0, keepdims=True)  # centre each column over genes (as PCA of the genes)
    U, S, _ = np.linalg.svd(Rc, full_matrices=False)
    k = int(max(1, min(dim, int((S.max(initial=0) * 1e-10 < S).sum()) or 1)))
    E = U[:, :k] * S[:k]  # (G, K) gene embedding (PCA scores)
    gidx = {g: i for i, g in enumerate(genes)}
    cols, rows = [], []
    for j, p in enumerate(t.pair_pert):
        parts = parse_perturbation(p)
        if parts and all(q in gidx for q in parts):
            cols.append(j)
            rows.append(E[[gidx[q] for q in parts]].sum(0))
    if not cols:
        return {"embedding": E, "W": np.zeros((k, k))}
    Pm = np.stack(rows)  # (S, K) perturbation embeddings
    Y = R[:, cols]  # (G, S)
    left = np.linalg.solve(E.T @ E + ridge * np.eye(k), E.T @ Y @ Pm)  # (K, K)
    W = np.linalg.solve((Pm.T @ Pm + ridge * np.eye(k)).T, left.T).T  # left @ (P'P + l I)^-1
    return {"embedding": E, "W": W}


def fit_baseline(
    config: BaselineConfig,
    X,
    perturbations: np.ndarray,
    contexts: np.ndarray,
    genes: list[str],
    control_label: str,
) -> tuple[Baseline, list[str]]:
    """Fit baseline ``config.name`` on training cells ``X`` (n, G) in model space.

    Returns the fitted model and the list of training pairs dropped for having fewer than
    ``config.min_cells`` cells.
    """
    if X.shape[1] != len(genes):
        msg = f"training data: X has {X.shape[1]} genes but {len(genes)} gene names"
        raise InputError(msg)
    table, dropped = fit_effect_table(X, perturbations, contexts, control_label, config.min_cells)
    return Baseline(config, list(genes), table, fitted_params(config, table, list(genes))), dropped


def fitted_params(config: BaselineConfig, table: EffectTable, genes: list[str]) -> dict[str, np.ndarray]:
    """The model parameters a baseline derives from its :class:`EffectTable` (alpha, linear E and W)."""
    if config.name == "scaled-context-transfer":
        alpha, pooled = _scaled_alpha(table)
        return {"alpha": alpha, "alpha_pooled": np.asarray(pooled)}
    if config.name == "linear":
        return _linear_params(table, list(genes), config.linear_dim, config.linear_ridge)
    return {}


def load_baseline(run_dir: str | Path, genes: list[str]) -> Baseline:
    """Load a baseline saved by :meth:`Baseline.save` (``genes`` from the run's genes.txt)."""
    path = Path(run_dir) / _NPZ
    if not path.exists():
        msg = f"run {run_dir}: {_NPZ} not found (expected a baseline run written by `celltwin train`)"
        raise InputError(msg)
    with np.load(path, allow_pickle=False) as a:
        cfg = BaselineConfig(**json.loads(str(a["config_json"])))
        table = EffectTable.from_arrays(a)
        params = {k[len("param_"):]: np.asarray(a[k]) for k in a.files if k.startswith("param_")}
    if table.n_genes != len(genes):
        msg = f"run {run_dir}: {_NPZ} has {table.n_genes} genes but genes.txt lists {len(genes)}"
        raise InputError(msg)
    return Baseline(cfg, genes, table, params)
