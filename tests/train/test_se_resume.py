"""`celltwin embed fit` through the shared loop: SIGKILL + re-run is bitwise exact, resume refuses
another fit's checkpoint, divergence is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("anndata")
from safetensors.torch import load_file

from celltwin.cli import main
from celltwin.train import load_checkpoint

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_se_cli.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
# 80 cells (2 contexts x (2 perturbations x 10 + 20 controls)) x 60 genes
SIM = ["sim", "--preset", "tiny", "--n-genes", "60", "--n-perts", "2", "--cells-per-pert", "10",
       "--n-controls", "20", "--no-progress"]


def _fit_args(data: Path, out: Path, steps: int = 16, *extra: str) -> list[str]:
    return ["embed", "fit", "--data", str(data), "-o", str(out), "--preset", "tiny", "--steps", str(steps),
            "--batch-size", "8", "--ckpt-every", "4", "--device", "cpu", "--precision", "fp32", "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("se_resume") / "sim.h5ad"
    assert main([*SIM, "-o", str(path)]) == 0
    return path


def _start(args: list[str], sleep: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env={**ENV, "SE_SLEEP": str(sleep)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err.decode()[-3000:]
    return out.decode()


@pytest.mark.slow
def test_embed_fit_killed_and_rerun_matches_uninterrupted(data, tmp_path, kill_after_checkpoint):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p_full = _start(_fit_args(data, full))
    p_kill = _start(_fit_args(data, killed), sleep=0.12)
    marker = killed / "checkpoints" / "last.json"
    at_kill = kill_after_checkpoint(p_kill, marker, 8, timeout=90)
    assert 8 <= at_kill < 16 and not (killed / "model.safetensors").exists()
    p_res = _start(_fit_args(data, killed))
    assert "for 16 steps" in _finish(p_full)
    assert "for 16 steps" in _finish(p_res)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert sorted(a) == sorted(b) and len(a) > 5
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())
    ca, cb = load_checkpoint(full / "checkpoints"), load_checkpoint(killed / "checkpoints")
    assert ca["step"] == cb["step"] == 16
    for k in ca["optimizer"]["state"]:
        assert torch.equal(ca["optimizer"]["state"][k]["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])


def test_embed_fit_refuses_a_checkpoint_of_another_fit(data, tmp_path, capsys):
    d = tmp_path / "d.h5ad"
    d.write_bytes(data.read_bytes())
    out = tmp_path / "m"
    assert main(_fit_args(d, out, 4)) == 0
    fp = load_checkpoint(out / "checkpoints")["fingerprint"]
    assert fp["data"]["size"] == d.stat().st_size and fp["rows"]["n"] == 80
    assert fp["options"]["batch_size"] == 8 and fp["preprocess"]["n_genes"] == 60
    capsys.readouterr()
    # another batch size: refused, one line, exit 2, naming the option
    assert main([*_fit_args(d, out, 8), "--batch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "options.batch_size: 8 in the checkpoint, 16 now" in err and "--no-resume" in err
    assert err.count("\n") == 1
    # another data file at the same path (a different simulation): refused on the data fingerprint
    assert main([*SIM, "--seed", "5", "-o", str(d)]) == 0
    capsys.readouterr()
    assert main(_fit_args(d, out, 8)) == 2
    err = capsys.readouterr().err
    assert "data.blake2b" in err and "data.mtime_ns" in err and "different run" in err
    # another learning rate: refused by the loop itself
    assert main([*SIM, "-o", str(d)]) == 0  # the original data again (same bytes, new mtime)
    assert main([*_fit_args(d, out, 8), "--no-resume"]) == 0
    capsys.readouterr()
    assert main([*_fit_args(d, out, 8), "--lr", "1e-4"]) == 2
    assert "TrainConfig.lr: 0.0003 in the checkpoint, 0.0001 now" in capsys.readouterr().err
    # same fit: nothing to do (already at 8 steps)
    assert main(_fit_args(d, out, 8)) == 0
    assert "for 8 steps" in capsys.readouterr().out


def test_embed_fit_with_a_huge_lr_is_a_one_line_error(data, tmp_path, capsys):
    out = tmp_path / "m"
    rc = main([*_fit_args(data, out, 40), "--lr", "1e6"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("celltwin embed") and ": error: training diverged at step " in err
    assert err.count("\n") == 1
    assert "peak lr=1e+06" in err and "lower it" in err
    at = int(err.split("diverged at step ")[1].split()[0])
    assert 1 <= at <= 40
    assert not (out / "model.safetensors").exists()
    saved = load_checkpoint(out / "checkpoints")
    if saved is not None:  # a checkpoint written before the divergence is finite and older
        assert saved["step"] < at and all(torch.isfinite(v).all() for v in saved["model"].values())
