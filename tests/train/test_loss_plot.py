"""loss.png of every torch run: the plotted data equal the logged losses (data separate from drawing),
written at each checkpoint and at the end, covering every step after a resume; ST and SE runs."""

from __future__ import annotations

import csv
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from celltwin._loss_plot import DPI, FIGSIZE_TWO, draw_loss_curve, loss_curve, smooth, write_loss_plot
from celltwin.train import TrainConfig, fit, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_toy as toy

MAX_PX = (int(FIGSIZE_TWO[0] * DPI), int(FIGSIZE_TWO[1] * DPI))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _logged(metrics: Path, split: str = "train", name: str = "loss") -> tuple[list[int], list[float]]:
    with metrics.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and r["name"] == name]
    return [int(r["step"]) for r in rows], [float(r["value"]) for r in rows]


def _cfg(out: Path, **kw) -> TrainConfig:
    base = {"max_steps": 12, "lr": 3e-2, "warmup_steps": 2, "log_every": 1, "ckpt_every": 4, "out_dir": str(out), "progress": False,
                "tensorboard": False, "precision": "fp32"}
    return TrainConfig(**{**base, **kw})


def test_fit_writes_loss_png_at_checkpoints_and_end(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    seen: dict[int, bool] = {}
    calls = [0]

    def step(model, batch):
        calls[0] += 1
        seen[calls[0]] = (out / "loss.png").exists()
        return toy.step(model, batch)

    seed_everything(0)
    fit(toy.make_model(), step, toy.ToyData(), _cfg(out))
    assert not any(seen[k] for k in range(1, 5)) and seen[5]  # written by the step-4 checkpoint
    png = out / "loss.png"
    w, h = _png_size(png)
    assert 300 <= w <= MAX_PX[0] and 200 <= h <= MAX_PX[1]
    assert png.stat().st_size < 300_000
    # the plotted data are the logged losses, step for step
    curve = loss_curve(out / "metrics.csv")
    steps, values = _logged(out / "metrics.csv")
    assert curve.steps == steps == list(range(1, 13))
    assert curve.values == values
    assert curve.val == {} and not curve.log_y and len(curve.smoothed) == 12
    # and the figure draws exactly those points
    fig = draw_loss_curve(curve)
    raw = fig.axes[0].lines[0]
    np.testing.assert_array_equal(raw.get_xdata(), steps)
    np.testing.assert_array_equal(raw.get_ydata(), values)
    assert fig.axes[0].get_xlabel() == "optimiser step" and "loss" in fig.axes[0].get_ylabel()
    assert not list(out.glob(".loss.png*"))  # atomic: no temporary left


def test_resumed_run_plots_every_step(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    seed_everything(0)
    fit(toy.make_model(), toy.step, toy.ToyData(), _cfg(out, max_steps=6, ckpt_every=3))
    first = loss_curve(out / "metrics.csv")
    assert first.steps == list(range(1, 7))
    before = (out / "loss.png").read_bytes()
    seed_everything(0)
    res = fit(toy.make_model(), toy.step, toy.ToyData(), _cfg(out, max_steps=12, ckpt_every=3))
    assert res.resumed_from == 6
    curve = loss_curve(out / "metrics.csv")
    assert curve.steps == list(range(1, 13)) and curve.values[:6] == first.values
    assert curve.values == _logged(out / "metrics.csv")[1]
    assert (out / "loss.png").read_bytes() != before  # redrawn with the resumed steps


def test_validation_points_and_log_scale(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    seed_everything(0)

    def val(model, step):
        return {"mae": 1.0 / step, "loss": 2.0 / step}

    fit(toy.make_model(), toy.step, toy.ToyData(), _cfg(out, val_every=4), val_fn=val)
    curve = loss_curve(out / "metrics.csv")
    assert curve.val["mae"] == ([4, 8, 12], [0.25, 0.125, 1 / 12])
    assert curve.val["loss"][0] == [4, 8, 12]
    fig = draw_loss_curve(curve)
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "validation"
    assert _png_size(out / "loss.png")[1] == MAX_PX[1]  # the two-panel layout

    # a range of more than two decades: log scale; a non-positive value: linear
    m = tmp_path / "m.csv"
    m.write_text("step,split,name,value\n" + "".join(f"{s},train,loss,{10.0 ** -s!r}\n" for s in range(1, 5)))
    assert loss_curve(m).log_y
    write_loss_plot(m, tmp_path / "log.png")
    assert _png_size(tmp_path / "log.png") == (int(9 * DPI), int(4.5 * DPI))
    m.write_text("step,split,name,value\n1,train,loss,-1.0\n2,train,loss,1000.0\n3,train,loss,nan\n4,train,lo")
    c = loss_curve(m)  # a non-finite value and a line cut by a kill are skipped
    assert c.steps == [1, 2] and not c.log_y and c.smoothed == []
    assert loss_curve(tmp_path / "missing.csv").steps == []
    write_loss_plot(tmp_path / "missing.csv", tmp_path / "empty.png")  # "no loss logged yet"
    assert _png_size(tmp_path / "empty.png")[0] > 0


def test_smooth_is_a_debiased_ema():
    assert smooth([]) == []
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    got = smooth([1.0, 0.0], span=3)  # alpha = 0.5: (0.5*0 + 0.5*1) / 0.75 after the second value
    assert got == pytest.approx([1.0, (0.5 * 0.5) / 0.75])


def test_no_plot_when_disabled(tmp_path):
    torch.set_num_threads(1)
    seed_everything(0)
    fit(toy.make_model(), toy.step, toy.ToyData(), _cfg(tmp_path / "run", max_steps=2, loss_plot=None))
    assert not (tmp_path / "run" / "loss.png").exists()


def test_st_and_se_runs_write_loss_png(tmp_path):
    """``celltwin train --model state`` (RUN/loss.png) and ``celltwin embed fit`` (MODEL/loss.png)."""
    from celltwin.runs import train_run
    from celltwin.sim import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny")
    run = tmp_path / "st"
    train_run("state", adata, run, options={"preset": "tiny", "steps": "4", "batch_sets": "2", "warmup": "1",
                                            "threads": "1", "progress": "false", "tensorboard": "false",
                                            "log_every": "1"})
    assert _png_size(run / "loss.png")[0] > 0 and not (run / "train" / "loss.png").exists()
    assert loss_curve(run / "train" / "metrics.csv").steps == [1, 2, 3, 4]

    from celltwin.models.se_options import SEOptions
    from celltwin.models.se_runner import fit_se

    se = tmp_path / "se"
    fit_se(adata, se, SEOptions.create(preset="tiny", steps=3, batch_size=16, num_workers=0, progress=False),
           log=lambda _m: None)
    assert _png_size(se / "loss.png")[0] > 0
    assert loss_curve(se / "metrics.csv").steps[-1] == 3
