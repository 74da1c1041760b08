"""The metric registry: profiles and directions against cell-eval 0.8.2's own lists, and the options."""

from __future__ import annotations

import pytest

from celltwin.errors import ConfigError
from celltwin.eval import EvalConfig
from celltwin.eval._registry import (
    BEST_ONE,
    BEST_ZERO,
    DE_METRICS,
    METRICS,
    PROFILE_METRICS,
    PROFILES,
    metric_names,
)


def _ce_columns(name: str) -> list[str]:
    return ["de_nsig_counts_real", "de_nsig_counts_pred"] if name == "de_nsig_counts" else [name]


@pytest.mark.reference
@pytest.mark.parametrize("profile", ["vcc", "pds", "minimal", "de", "full"])
def test_profiles_are_cell_evals(profile):
    """Columns and their order as cell-eval's MetricPipeline writes them (DE metrics first, then AnnData)."""
    pytest.importorskip("cell_eval")
    from cell_eval._pipeline._runner import MetricPipeline
    from cell_eval._types import MetricType
    from cell_eval.metrics import metrics_registry

    de = set(metrics_registry.list_metrics(MetricType.DE))
    listed = MetricPipeline(profile=profile)._metrics
    order = [m for m in listed if m in de] + [m for m in listed if m not in de]
    want = [c for m in order for c in _ce_columns(m)]
    assert list(PROFILE_METRICS[profile]) == want
    assert {c for m in de for c in _ce_columns(m)} == set(DE_METRICS)


@pytest.mark.reference
def test_registry_matches_cell_evals_registry():
    pytest.importorskip("cell_eval")
    from cell_eval._types import MetricBestValue, MetricType
    from cell_eval.metrics import metrics_registry

    ce = metrics_registry.metrics
    assert {c for m in ce for c in _ce_columns(m)} == set(METRICS)
    for name, m in METRICS.items():
        info = ce[m.cell_eval_name]
        assert (m.kind == "de") == (info.type == MetricType.DE), name
        want = {MetricBestValue.ONE: True, MetricBestValue.ZERO: False, MetricBestValue.NONE: None}
        assert m.higher_is_better is want[info.best_value], name
    assert {"mse", "mae", "mse_delta", "mae_delta"} == BEST_ZERO
    assert BEST_ONE.isdisjoint(BEST_ZERO) and "de_nsig_counts_real" not in BEST_ONE | BEST_ZERO
    assert set(PROFILES) == {"vcc", "pds", "minimal", "de", "full"}


def test_skip_metrics_config():
    assert metric_names("vcc", ("mae",)) == ("overlap_at_N", "discrimination_score_l1")
    assert metric_names("full", ("de_nsig_counts",))[:10] == PROFILE_METRICS["full"][:10]
    assert "de_nsig_counts_real" not in metric_names("full", ("de_nsig_counts",))
    assert metric_names("vcc", ("pearson_edistance",)) == PROFILE_METRICS["vcc"]  # not in the profile
    assert EvalConfig(skip_metrics="mae").skip_metrics == ("mae",)
    with pytest.raises(ConfigError, match=r"unknown metric 'maae' \(valid: .*de_nsig_counts, .*mae, "):
        EvalConfig(skip_metrics=("maae",))
    with pytest.raises(ConfigError, match="removes every metric of profile 'pds'"):
        EvalConfig(profile="pds", skip_metrics=("discrimination_score_l1",))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", "x"])
def test_num_threads_config(bad):
    assert EvalConfig(num_threads=3).num_threads == 3
    with pytest.raises(ConfigError, match="num_threads must be a positive integer"):
        EvalConfig(num_threads=bad)
