"""Exact resume through a real DataLoader (SIGKILL mid-run), and resume refusing another run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from celltwin.errors import ConfigError
from celltwin.train import TrainConfig, fit, seed_everything

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _train_toy as toy

SCRIPT = HERE / "_train_dl.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}


def _start(out: Path, steps: int, ckpt_every: int, sleep: float, workers: int, shuffle: bool):
    # own session: the SIGKILL below goes to the whole group (the DataLoader workers too)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(steps), str(ckpt_every), str(sleep), str(workers),
         "1" if shuffle else "0"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "shuffle"), [(0, False), (2, True)])
def test_sigkill_resume_with_real_dataloader_is_bitwise_exact(tmp_path, workers, shuffle,
                                                              kill_after_checkpoint):
    """Iterating a DataLoader draws from the global torch RNG (worker base_seed; the permutation
    of an unseeded shuffle); the loop isolates those draws, so a run killed after its step-8
    checkpoint and re-run ends with exactly the weights of an uninterrupted run."""
    steps, every = 16, 4  # 5 batches per epoch: checkpoints at steps 4, 8, 12 are mid-epoch
    full, killed = tmp_path / "full", tmp_path / "killed"
    p_full = _start(full, steps, every, 0.0, workers, shuffle)
    p_kill = _start(killed, steps, every, 0.15, workers, shuffle)
    marker = killed / "checkpoints" / "last.json"
    at_kill = kill_after_checkpoint(p_kill, marker, 8, timeout=60)
    assert 8 <= at_kill < steps and not (killed / "final.pt").exists()
    p_res = _start(killed, steps, every, 0.0, workers, shuffle)
    _finish(p_full)
    _finish(p_res)
    a, b = torch.load(full / "final.pt"), torch.load(killed / "final.pt")
    assert a["resumed_from"] is None and b["resumed_from"] == at_kill
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), (k, (a["params"][k] - b["params"][k]).abs().max())
    assert a["loss"] == b["loss"]


def test_loader_iteration_leaves_training_rng_untouched():
    """The training RNG stream is the same whether or not the loader draws from the global RNG."""
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(HERE))
    from _train_dl import EpochData

    draws = {}
    for shuffle in (False, True):
        seen = []

        def step(m, b, seen=seen):
            seen.append(torch.rand(()).item())  # what dropout etc. would draw
            return toy.step(m, b)

        seed_everything(0)
        loader = DataLoader(EpochData(32), batch_size=16, shuffle=shuffle)
        fit(toy.make_model(), step, loader, TrainConfig(max_steps=5, progress=False, log_every=0, seed=3))
        draws[shuffle] = seen
    assert draws[False] == draws[True] and len(draws[True]) == 5
    torch.manual_seed(3)  # fit seeds with seed + rank; the loader's draws did not shift the stream
    assert draws[True][0] == torch.rand(()).item()


def _cfg(out, **kw):
    base = {"max_steps": 4, "lr": 1e-2, "out_dir": str(out), "progress": False, "tensorboard": False,
            "log_every": 0, "precision": "fp32"}
    return TrainConfig(**{**base, **kw})


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    data = list(toy.ToyData(n_batches=3))
    fp = {"data": {"size": 10, "blake2b": "aa"}, "split": "s1", "options": {"hidden": 8}}
    fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=2, fingerprint=fp))
    # different data and option: refused, naming the differing keys
    other = {"data": {"size": 10, "blake2b": "bb"}, "split": "s1", "options": {"hidden": 16}}
    with pytest.raises(ConfigError) as e:
        fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=4, fingerprint=other))
    msg = str(e.value)
    assert "data.blake2b" in msg and "options.hidden" in msg and "split" not in msg
    assert "'aa' in the checkpoint, 'bb' now" in msg and "resume=false" in msg and "\n" not in msg
    # an lr change is refused too (the restored optimiser would silently keep the old lr)
    with pytest.raises(ConfigError, match=r"TrainConfig\.lr: 0\.01 in the checkpoint, 0\.001 now"):
        fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=4, fingerprint=fp, lr=1e-3))
    # same fingerprint (tuples normalised like JSON): resumes and extends to 4 steps
    res = fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=4, fingerprint=dict(fp)))
    assert res.resumed_from == 2 and res.step == 4
    # already at max_steps: nothing to do
    res = fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=4, fingerprint=fp))
    assert res.resumed_from == 4 and res.step == 4
    # resume=false starts over whatever the checkpoint says
    res = fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=1, fingerprint=other, resume=False))
    assert res.resumed_from is None and res.step == 1


def test_fingerprint_and_extra_state_must_be_plain(tmp_path):
    with pytest.raises(ConfigError, match="fingerprint must be plain JSON"):
        TrainConfig(fingerprint={"path": Path("x")})
    assert TrainConfig(fingerprint={"a": (1, 2)}).fingerprint == {"a": [1, 2]}
    with pytest.raises(ConfigError, match=r"extra_state\.opts\.file: pathlib\.\w*Path"):
        fit(toy.make_model(), toy.step, list(toy.ToyData(n_batches=1)), _cfg(tmp_path),
            extra_state={"opts": {"file": Path("x")}})
