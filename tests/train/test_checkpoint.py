"""Checkpoint safety (weights_only, hostile / corrupt files), stale temp files, file fingerprints,
divergence errors, and the loopback default of the distributed setup."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from celltwin.errors import CelltwinError, ConfigError, InputError
from celltwin.train import (
    DivergenceError,
    TrainConfig,
    file_fingerprint,
    fit,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    seed_everything,
)
from celltwin.train.checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _train_toy as toy


class _Evil:
    """Unpickling this calls os.system (what a crafted last.pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cfg(out, **kw):
    base = {"max_steps": 4, "lr": 1e-2, "out_dir": str(out), "progress": False, "tensorboard": False,
            "log_every": 0, "precision": "fp32"}
    return TrainConfig(**{**base, **kw})


def test_checkpoint_roundtrip_is_weights_only_and_restores_rng(tmp_path):
    seed_everything(7)
    random.random(), np.random.normal(), torch.rand(3)  # move every stream (NumPy has a cached gaussian)
    st = rng_state(torch.device("cpu"))
    expect = (random.random(), np.random.normal(), float(torch.rand(())))
    save_checkpoint(tmp_path, {"step": 3, "epoch": 1, "rng": [st], "extra": {"t": (1, "a", None)}})
    # the file itself loads with the plain weights-only unpickler (no celltwin code involved)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["extra"] == {"t": (1, "a", None)}
    loaded = load_checkpoint(tmp_path)
    seed_everything(0)
    set_rng_state(loaded["rng"][0], torch.device("cpu"))
    assert (random.random(), np.random.normal(), float(torch.rand(()))) == expect
    assert json.loads((tmp_path / "last.json").read_text()) == {"step": 3, "epoch": 1}


@pytest.mark.parametrize("how", ["pickle2", "pickle5", "torch_save"])
def test_hostile_checkpoint_is_refused_without_running_it(tmp_path, how):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    evil = {"model": _Evil(marker), "step": 1}
    if how.startswith("pickle"):
        (ckpt / "last.pt").write_bytes(pickle.dumps(evil, protocol=int(how[-1])))
    else:
        torch.save(evil, ckpt / "last.pt")
    with pytest.raises(InputError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert str(ckpt / "last.pt") in msg and "not a celltwin checkpoint" in msg and "non-tensor" in msg
    assert "\n" not in msg and "resume=false" in msg
    if how != "pickle5":  # protocol 5 is refused at its first opcode, before the global is reached
        assert "non-tensor objects (global posix.system) that would run code" in msg, msg
    # through fit (what `celltwin train` does on resume): refused too, nothing executed
    with pytest.raises(InputError, match="non-tensor objects"):
        fit(toy.make_model(), toy.step, list(toy.ToyData(n_batches=2)), _cfg(tmp_path / "run"))
    assert not marker.exists()


def test_old_format_numpy_pickle_is_refused_with_restart_hint(tmp_path):
    # what celltwin wrote before: NumPy RNG arrays pickled with weights_only=False
    torch.save({"step": 1, "epoch": 0, "rng": [{"numpy": np.random.get_state()}]}, tmp_path / "last.pt")
    with pytest.raises(InputError, match=r"older celltwin is refused too: start fresh with --set resume=false"):
        load_checkpoint(tmp_path)
    # a plain-data file that is not ours (no format marker)
    torch.save({"step": 1}, tmp_path / "last.pt")
    with pytest.raises(InputError, match="not a celltwin checkpoint of this version"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("cut", [0, 100, -200])
def test_truncated_checkpoint_gives_one_line_error(tmp_path, cut):
    save_checkpoint(tmp_path, {"step": 1, "epoch": 0, "w": torch.randn(1000)})
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[:cut])
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "last.pt") in msg and "not a readable celltwin checkpoint" in msg and "\n" not in msg


def test_stale_temp_files_removed_at_start_and_on_save(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    stale = [ckpt / ".last.pt.abc123_x.tmp.pt", ckpt / f".last.pt.{2**22 + 12345}-abcdefgh.tmp.pt",
             ckpt / ".last.json.q1w2e3r4.tmp.json"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    live = ckpt / f".last.pt.{os.getppid()}-abcdefgh.tmp.pt"  # a live process's write in progress: kept
    live.write_bytes(b"x")
    keep = [ckpt / "last.pt.bak", ckpt / ".other.pt.abcdefgh.tmp.pt", live]
    for p in keep[:2]:
        p.write_bytes(b"x")
    fit(toy.make_model(), toy.step, list(toy.ToyData(n_batches=2)), _cfg(tmp_path, max_steps=1))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".last")) == [live.name]
    # a later save removes new leftovers too
    stale[0].write_bytes(b"x")
    save_checkpoint(ckpt, {"step": 2, "epoch": 0})
    assert not stale[0].exists() and remove_stale_temp_files(ckpt) == []


def test_file_fingerprint(tmp_path):
    small, big = tmp_path / "a.bin", tmp_path / "b.bin"
    small.write_bytes(b"hello")
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size=3 * 2**20, dtype=np.uint8).tobytes()
    big.write_bytes(blob)
    fs, fb = file_fingerprint(small), file_fingerprint(big)
    assert fs["size"] == 5 and fb["size"] == 3 * 2**20 and len(fb["blake2b"]) == 32
    assert set(fs) == {"size", "mtime_ns", "blake2b"} and fs["mtime_ns"] == small.stat().st_mtime_ns
    assert file_fingerprint(small) == fs  # stable
    # a byte changed in the last MiB: different hash; in the middle: same hash (documented), same size
    changed = bytearray(blob)
    changed[-10] ^= 1
    big.write_bytes(bytes(changed))
    assert file_fingerprint(big)["blake2b"] != fb["blake2b"]
    changed[-10] ^= 1
    changed[int(1.5 * 2**20)] ^= 1
    big.write_bytes(bytes(changed))
    os.utime(big, ns=(fb["mtime_ns"], fb["mtime_ns"]))
    assert file_fingerprint(big) == fb
    with pytest.raises(InputError, match="cannot fingerprint"):
        file_fingerprint(tmp_path / "missing.h5ad")


class _InfGrad(torch.autograd.Function):
    """Identity forward (finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_huge_lr_is_a_divergence_error_and_keeps_the_checkpoint(tmp_path):
    data = list(toy.ToyData(n_batches=3))
    seed_everything(0)
    fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=2))
    ckpt = tmp_path / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    # start over with lr 1e6 (what `--set lr=1e6` did: exit 0 with every weight NaN)
    with pytest.raises(DivergenceError) as e:
        fit(toy.make_model(), toy.step, data,
            _cfg(tmp_path, max_steps=50, lr=1e6, resume=False, grad_clip=None, warmup_steps=0))
    msg = str(e.value)
    assert isinstance(e.value, CelltwinError) and e.value.exit_code == 2 and "\n" not in msg
    assert "training diverged at step " in msg and "peak lr=1e+06" in msg and "e.g. lr=100000" in msg
    at = int(msg.split("training diverged at step ")[1].split()[0])
    assert 2 <= at <= 50  # step 1 (weights ~1e6) is still finite
    assert ckpt.read_bytes() == before  # the good checkpoint on disk is untouched
    assert "this run wrote no checkpoint yet" in msg


@pytest.mark.parametrize("where", ["loss", "grad", "params"])
def test_each_divergence_check(tmp_path, where):
    """A non-finite loss stops before backward; a non-finite gradient norm (no fp16 scaling) stops
    before the optimiser step; non-finite parameters after a step (no clipping, so no norm) stop
    too. Only finite checkpoints are written: the step-3 one stays the newest."""
    data = list(toy.ToyData(n_batches=3))
    clip = None if where == "params" else 1.0
    seed_everything(0)
    fit(toy.make_model(), toy.step, data, _cfg(tmp_path, max_steps=2, grad_clip=clip))
    ckpt = tmp_path / "checkpoints" / "last.pt"
    calls = {"n": 0}

    def step(m, b):
        calls["n"] += 1
        parts = dict(toy.step(m, b))
        if calls["n"] == 2:  # the second step of the resumed run = step 4
            if where == "loss":
                parts["loss"] = parts["loss"] * float("nan")
            else:
                parts["loss"] = _InfGrad.apply(parts["loss"])
        return parts

    with pytest.raises(DivergenceError) as e:
        fit(toy.make_model(), step, data, _cfg(tmp_path, max_steps=6, grad_clip=clip, ckpt_every=1))
    msg = str(e.value)
    want = {"loss": "non-finite loss (nan)", "grad": "non-finite gradient norm (",
            "params": "non-finite parameters after the optimiser step"}[where]
    assert "training diverged at step 4 (epoch 1)" in msg and want in msg, msg
    assert f"the last good checkpoint (step 3) is kept in {ckpt}" in msg
    saved = load_checkpoint(ckpt.parent)
    assert saved["step"] == 3 and json.loads((ckpt.parent / "last.json").read_text())["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert calls["n"] == 2


def test_loopback_master_addr_default(monkeypatch):
    from celltwin.train import distributed

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    distributed._default_loopback_master()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")  # a launcher's choice is kept
    distributed._default_loopback_master()
    assert os.environ["MASTER_ADDR"] == "10.0.0.5"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_PORT is not set"):
        distributed._default_loopback_master()


# slow: two processes importing torch and meeting over gloo (~5 s on 2 cores); the quick loop keeps
# the in-process rules of _default_loopback_master (test_loopback_master_addr_default)
@pytest.mark.slow
def test_two_ranks_without_master_addr_rendezvous_on_loopback(tmp_path):
    """RANK/WORLD_SIZE/MASTER_PORT only: the ranks meet on 127.0.0.1 (and train in sync)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1] / "src"), WORLD_SIZE="2",
               MASTER_PORT=str(port))
    code = ("import os, torch.distributed as d; from celltwin.train import init_distributed;"
            "i = init_distributed('cpu'); print(os.environ['MASTER_ADDR'], i.rank, i.world_size);"
            "d.destroy_process_group()")
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        outs.append(out.decode().split())
    assert outs == [["127.0.0.1", "0", "2"], ["127.0.0.1", "1", "2"]]


def test_rng_state_is_plain_data():
    st = rng_state(torch.device("cpu"))
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back["python"]["state"].dtype == torch.int64 and back["python"]["state"].numel() == 625
    assert back["numpy"]["name"] == "MT19937" and back["numpy"]["key"].numel() == 624
