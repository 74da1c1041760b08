"""The demo spine: simulate -> split -> train every model -> predict -> evaluate -> table + report.

:func:`run_demo` runs the whole pipeline on the embedded simulator (:mod:`celltwin.sim`) in
memory, writing every intermediate file a user would write with the CLI (data, split, run
directories, predictions, real cells, per-model evaluation) so any step can be re-run by hand.

The task (few-shot context generalisation, like the VCC): the target context is the simulator's
last context; half of its perturbations (drawn by :func:`celltwin.data.split_draw.make_split` with the
demo seed) are held out for testing, the other half and every perturbation of the other contexts are trained on, with all
control cells. Every model predicts the held-out perturbations from the target context's
controls, with as many cells as the real test split has.

Reported per model: DES (``overlap_at_N``), PDS (``discrimination_score_l1``) and MAE means from
:func:`celltwin.eval.evaluate`, the score normalised against the project's ``cell-mean`` model
(:func:`celltwin.eval.score`; the VCC formula, but that model is not the VCC baseline:
``celltwin score`` gives the VCC score), and ``pearson_true``: the Pearson correlation between the predicted
pseudobulk change (log1p space, mean predicted cell minus mean control) and the simulator's true
log-fold effect, averaged over the test perturbations. ``pearson_true`` of the *real* test cells
(row ``observed``) is the ceiling that sampling noise leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL, SIM_UNS_KEY
from celltwin._io import atomic_path
from celltwin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

__all__ = ["DemoConfig", "DemoResult", "demo_models", "model_options", "pearson_rows", "run_demo"]

BASELINE_ORDER = ("control", "cell-mean", "perturbation-mean", "context-transfer", "scaled-context-transfer",
                  "linear", "additive")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``models=None`` means every baseline plus every other registered model.

    ``model_options``: extra ``--set`` strings per model, applied over the model's demo defaults
    (see :func:`model_options`).
    """

    preset: str = "demo"
    seed: int = 0
    models: tuple[str, ...] | None = None
    report: bool = True
    model_options: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from celltwin.sim import PRESETS

        if self.preset not in PRESETS:
            msg = f"demo: preset expected one of {', '.join(sorted(PRESETS))}, got {self.preset!r}"
            raise ConfigError(msg)


@dataclass
class DemoResult:
    table: pd.DataFrame  # one row per model (+ "observed")
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


def demo_models(requested: Sequence[str] | None = None) -> list[str]:
    """Models the demo runs: the baselines first, then other registered models (e.g. ``state``)."""
    from celltwin.registry import MODELS

    if requested is not None:
        bad = [m for m in requested if m not in MODELS]
        if bad:
            msg = f"demo: unknown model(s) {', '.join(bad)}; expected some of {', '.join(MODELS)}"
            raise ConfigError(msg)
        return list(requested)
    extra = [m for m in MODELS if m not in BASELINE_ORDER and _available(m)]
    return list(BASELINE_ORDER) + extra


def model_options(name: str, overrides: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Options a model trains with in the demo.

    A registered model's options module may define ``DEMO_OPTIONS`` (``--set`` strings sized for the
    demo's time budget) or ``DEMO_OPTIONS_FOR[name]`` (per model name, used first);
    ``overrides[name]`` is applied on top. Baselines use their defaults.
    """
    import importlib

    from celltwin.registry import get_spec

    opts: dict[str, str] = {}
    if name not in BASELINE_ORDER:
        mod = importlib.import_module(get_spec(name).options.partition(":")[0])
        per_model = getattr(mod, "DEMO_OPTIONS_FOR", {})
        opts.update(per_model[name] if name in per_model else getattr(mod, "DEMO_OPTIONS", {}))
    opts.update((overrides or {}).get(name, {}))
    return opts


def _available(model: str) -> bool:
    """A non-baseline model runs in the demo only when its module imports (torch installed)."""
    import importlib

    from celltwin.registry import get_spec

    try:
        importlib.import_module(get_spec(model).module)
    except ImportError:
        return False
    return True


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (P, G) arrays in float64; NaN where a row is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _make_split(adata: ad.AnnData, path: Path, seed: int):
    """Write the demo's few-shot split (:func:`celltwin.data.split_draw.make_split`) and resolve it
    (:func:`celltwin.pipeline.resolve_dataset_split`, as ``celltwin train`` does)."""
    from celltwin.data.columns import ObsColumns
    from celltwin.data.dataset import CellDataset
    from celltwin.data.split_draw import make_split
    from celltwin.pipeline import resolve_dataset_split

    cols = ObsColumns().present(adata.obs)
    target = sorted(set(adata.obs[CONTEXT_COL].astype(str).tolist()))[-1]
    split = make_split(adata.obs, cols, target, holdout=0.5, seed=seed, data_path="data.h5ad")
    split.write(path)
    dataset = CellDataset.from_anndata(adata, cols, name=next(iter(split.datasets)))
    return resolve_dataset_split(dataset, split, require_test=True)


def run_demo(out_dir: str | Path, config: DemoConfig | None = None,
             log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo and write everything under ``out_dir`` (see the module docstring)."""
    import pandas as pd

    from celltwin.data.preprocess import Preprocessing
    from celltwin.eval import EvalConfig, evaluate
    from celltwin.predict import PredictRequest, predict_cells
    from celltwin.runs import load_predictor, train_run
    from celltwin.sim import simulate

    cfg = config or DemoConfig()
    say = log or (lambda s: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = demo_models(cfg.models)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    adata = simulate(cfg.preset) if cfg.seed == 0 else simulate(_preset_with_seed(cfg.preset, cfg.seed))
    with atomic_path(out / "data.h5ad", suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    truth = adata.uns[SIM_UNS_KEY]
    rs = _make_split(adata, out / "split.toml", cfg.seed)
    (target,) = {c for c, _ in rs.test_pairs}
    test = [p for _, p in rs.test_pairs]
    timings["simulate"] = time.perf_counter() - t0
    say(f"simulated {adata.n_obs} cells x {adata.n_vars} genes; target context {target}, {len(test)} test perturbations")

    ctxs = adata.obs[CONTEXT_COL].astype(str).to_numpy()
    perts = adata.obs[PERT_COL].astype(str).to_numpy()
    real_rows = np.flatnonzero((ctxs == target) & (np.isin(perts, test) | (perts == CONTROL_LABEL)))
    real = adata[real_rows].copy()
    real.obs = real.obs[[PERT_COL, CONTEXT_COL]].copy()
    with atomic_path(out / "real.h5ad", suffix=".h5ad") as tmp:
        real.write_h5ad(tmp)
    train = adata[rs.train_rows].copy()
    ctrl_rows = np.flatnonzero((ctxs == target) & (perts == CONTROL_LABEL))
    n_cells = [int(np.sum((ctxs == target) & (perts == p))) for p in test]

    # truth in the test order (genes are var order)
    t_perts = [str(p) for p in truth["perturbations"]]
    t_ctxs = [str(c) for c in truth["contexts"]]
    true_effect = np.asarray(truth["effect"])[t_ctxs.index(target)][[t_perts.index(p) for p in test]]

    rows: list[dict[str, Any]] = []
    de_real = None
    base_agg = None
    preds_delta: dict[str, np.ndarray] = {}
    results_by_model: dict[str, pd.DataFrame] = {}
    eval_cfg = EvalConfig()
    for name in models:
        t1 = time.perf_counter()
        run_dir = out / "runs" / name
        opts = model_options(name, cfg.model_options)
        train_run(name, train, run_dir, seed=cfg.seed, options=opts,
                         extra_meta={"data": str(out / "data.h5ad"), "split": str(out / "split.toml")})
        predictor = load_predictor(run_dir)
        pre = Preprocessing.load(run_dir)
        C = pre.transform(adata.X[ctrl_rows], pre.gene_index(adata.var_names, "demo data"))
        pred = predict_cells(predictor, C, PredictRequest(target, list(test), n_cells), seed=cfg.seed)
        with atomic_path(out / "preds" / f"{name}.h5ad", suffix=".h5ad") as tmp:
            pred.write_h5ad(tmp)
        res = evaluate(pred, real.copy(), config=eval_cfg, de_real=de_real)
        de_real = res.de_real
        res.write(out / "eval" / name, report=False)
        order = [list(res.bulk["perts"]).index(p) for p in test]
        delta_pred = np.asarray(res.bulk["delta_pred"])[order]
        preds_delta[name] = delta_pred
        if "observed" not in preds_delta:
            preds_delta["observed"] = np.asarray(res.bulk["delta_real"])[order]
        results_by_model[name] = res.results
        if name == "cell-mean":
            base_agg = res.agg
        from celltwin.predict import summarize_sources

        sources = summarize_sources(pred)
        n_fb = sum(1 for s in sources.values() if s != "model")
        mean = res.agg.set_index("statistic").loc["mean"]
        rows.append({
            "model": name,
            "DES": float(mean["overlap_at_N"]),
            "PDS": float(mean["discrimination_score_l1"]),
            "MAE": float(mean["mae"]),
            "pearson_true": float(np.nanmean(pearson_rows(delta_pred, true_effect))),
            "fallbacks": n_fb,
            "_agg": res.agg,
        })
        timings[name] = time.perf_counter() - t1
        say(f"{name}: trained, predicted and evaluated in {timings[name]:.1f}s")

    if base_agg is not None:
        from celltwin.eval import score

        for r in rows:
            r["score"] = _avg_score(score(r["_agg"], base_agg))
    for r in rows:
        r.pop("_agg")
    obs_row = {"model": "observed", "DES": np.nan, "PDS": np.nan, "MAE": np.nan,
               "pearson_true": float(np.nanmean(pearson_rows(preds_delta["observed"], true_effect))),
               "fallbacks": 0, "score": np.nan}
    table = pd.DataFrame(rows + [obs_row])
    cols = ["model", "DES", "PDS", "MAE", "score", "pearson_true", "fallbacks"]
    table = table[[c for c in cols if c in table.columns]]
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    if cfg.report:
        timings["total"] = time.perf_counter() - t0
        _write_report(out / "report", table, test, true_effect, preds_delta, results_by_model, target, cfg, timings)
    timings["total"] = time.perf_counter() - t0
    return DemoResult(table=table, out_dir=out, timings=timings)


def _preset_with_seed(preset: str, seed: int):
    from celltwin.sim import SimConfig

    return SimConfig.preset(preset, seed=seed)


def _avg_score(frame) -> float:
    """The ``avg_score`` row of a score table (pandas or polars, cell-eval's layout)."""
    df = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    row = df.loc[df["metric"] == "avg_score"]
    return float(row["from_baseline"].iloc[0])


# ---------------------------------------------------------------------------- report
def _write_report(rdir: Path, table: pd.DataFrame, test: list[str], true_effect: np.ndarray,
                  deltas: dict[str, np.ndarray], results: dict[str, pd.DataFrame], target: str,
                  cfg: DemoConfig, timings: dict[str, float]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    models = [m for m in table["model"] if m != "observed"]

    # 1. metrics per model
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, col in zip(axes, ["DES", "PDS", "MAE", "pearson_true"], strict=True):
        vals = table.set_index("model").loc[models, col].to_numpy(dtype=float)
        ax.barh(models, vals, color="#4C72B0")
        ax.set_title(col + (" (lower is better)" if col == "MAE" else " (higher is better)"))
        ax.invert_yaxis()
    fig.tight_layout()
    written.append(_savefig(fig, rdir / "metrics.png"))
    plt.close(fig)

    # 2. predicted vs true change, one panel per model
    n = len(models)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), squeeze=False)
    t = true_effect.ravel()
    for ax, m in zip(axes.ravel(), models, strict=False):
        d = deltas[m].ravel()
        ax.scatter(t, d, s=3, alpha=0.3, color="#DD8452")
        r = pearson_rows(t[None, :], d[None, :])[0]
        ax.set_title(f"{m} (r={r:.2f})", fontsize=9)
        ax.set_xlabel("true log-fold effect", fontsize=8)
        ax.set_ylabel("predicted change (log1p)", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    written.append(_savefig(fig, rdir / "pred_vs_true.png"))
    plt.close(fig)

    # 3. per-perturbation PDS heatmap
    fig, ax = plt.subplots(figsize=(0.5 * len(test) + 3, 0.35 * n + 1.5))
    mat = np.array([results[m].set_index("perturbation").loc[test, "discrimination_score_l1"].to_numpy(dtype=float)
                    for m in models])
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(n), models, fontsize=8)
    ax.set_xticks(range(len(test)), test, rotation=90, fontsize=7)
    ax.set_title("PDS per test perturbation (1 = the true perturbation is the closest)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(_savefig(fig, rdir / "pds_per_perturbation.png"))
    plt.close(fig)

    md = _markdown(table, test, target, cfg, timings)
    with atomic_path(rdir / "index.md") as tmp:
        tmp.write_text(md)
    written.append(rdir / "index.md")
    html = _html(table, test, target, cfg, timings)
    with atomic_path(rdir / "index.html") as tmp:
        tmp.write_text(html)
    written.append(rdir / "index.html")
    return written


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


_INTRO = (
    "Few-shot context generalisation on the embedded simulator: the models saw the target context's "
    "controls and half of its perturbations (plus every perturbation in the other contexts) and predict "
    "the other half. DES / PDS / MAE: cell-eval 0.8.2 metrics, means over the test perturbations (DES, PDS: "
    "higher is better, PDS = 1 - rank/P of the true perturbation among all; MAE: lower is better). score: normalised against the project's `cell-mean` model with the VCC formula (0 = no better; not the VCC score, whose baseline is cell-eval's cell-mean: `celltwin score`). "
    "pearson_true: correlation of the predicted pseudobulk change with the simulator's true log-fold effect; "
    "the `observed` row is the same for the real held-out cells (the ceiling sampling noise leaves)."
)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.3f}"
    return str(v)


def _markdown(table, test, target, cfg, timings) -> str:
    cols = list(table.columns)
    lines = [f"# celltwin demo (simulator preset `{cfg.preset}`, seed {cfg.seed})", "", _INTRO, "",
             f"Target context `{target}`; {len(test)} test perturbations: {', '.join(test)}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    lines += ["", "![metrics](metrics.png)", "", "![predicted vs true](pred_vs_true.png)", "",
              "![PDS per perturbation](pds_per_perturbation.png)", "",
              f"Total time {timings.get('total', float('nan')):.1f}s.", ""]
    return "\n".join(lines)


def _html(table, test, target, cfg, timings) -> str:
    import html as h

    cols = list(table.columns)
    head = "".join(f"<th>{h.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{h.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>"
                   for _, r in table.iterrows())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>celltwin demo</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 8px;"
            f"text-align:right}}</style></head><body><h1>celltwin demo (preset {h.escape(cfg.preset)}, seed "
            f"{cfg.seed})</h1><p>{h.escape(_INTRO)}</p><p>Target context <code>{h.escape(target)}</code>; "
            f"{len(test)} test perturbations.</p><table><tr>{head}</tr>{body}</table>"
            f"<img src='metrics.png' width='100%'><img src='pred_vs_true.png' width='100%'>"
            f"<img src='pds_per_perturbation.png'><p>Total time {timings.get('total', float('nan')):.1f}s.</p>"
            f"</body></html>\n")
