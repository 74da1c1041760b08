"""Training progress: plain lines when stderr is not a terminal (a log file), a rich bar on a terminal."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import torch

from celltwin.train import TrainConfig, fit, seed_everything
from celltwin.train.progress import TrainProgress, plain_progress_every

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_toy as toy

LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) (\d+\.\d) it/s$")


def test_plain_progress_every():
    assert plain_progress_every(500, 10) == 10  # 50 lines
    assert plain_progress_every(100_000, 10) == 1000  # at most ~100 lines, multiples of log_every
    assert plain_progress_every(1001, 10) == 20
    assert plain_progress_every(50, 0) == 1
    assert plain_progress_every(1000, 0) == 10


def test_fit_writes_plain_progress_lines_to_a_non_tty_stderr(capsys):
    torch.set_num_threads(1)
    seed_everything(0)
    cfg = TrainConfig(max_steps=10, log_every=2, progress=True, tensorboard=False, precision="fp32")
    res = fit(toy.make_model(), toy.step, toy.ToyData(), cfg)
    captured = capsys.readouterr()
    assert captured.out == ""  # progress goes to stderr only
    lines = captured.err.splitlines()
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == [2, 4, 6, 8, 10]
    assert {int(m.group(2)) for m in parsed} == {10}
    # the loss shown is the mean over the last log window, as in the metrics
    assert parsed[-1].group(3) == f"{res.last_losses['loss']:.4g}"
    assert all(float(m.group(4)) > 0 for m in parsed)


def test_progress_helper_plain_and_tty():
    log = io.StringIO()  # not a terminal
    p = TrainProgress(7, 0, 3, stream=log)
    for step in range(1, 8):
        p.update(step, 0.5 if step >= 3 else None)
    p.close()
    got = [re.sub(r" \d+\.\d it/s$", " R it/s", ln) for ln in log.getvalue().splitlines()]
    assert got == ["step 3/7 loss 0.5 R it/s", "step 6/7 loss 0.5 R it/s", "step 7/7 loss 0.5 R it/s"]
    assert p.line(100, None, 12.34) == "step 100/7 12.3 it/s"  # no loss before the first log window

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    p = TrainProgress(7, 0, 3, stream=term)
    assert p.tty
    for step in range(1, 8):
        p.update(step, 0.5)
    p.close()
    assert "7/7" in term.getvalue() and not re.search(r"^step \d+/7", term.getvalue(), re.MULTILINE)
