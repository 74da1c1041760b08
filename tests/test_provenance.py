"""run.json provenance (celltwin._provenance) and the -q / -v logging levels of the CLI."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from celltwin import _provenance as prov
from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"package_versions", "git_revision", "git_dirty", "argv", "started_at", "finished_at", "host",
        "data_fingerprints", "precision"}
ST_SETS = {"preset": "tiny", "steps": "3", "batch_sets": "2", "warmup": "1", "threads": "1", "num_workers": "0",
           "tensorboard": "false", "log_every": "1"}


def _head() -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def _when(text: str) -> datetime.datetime:
    t = datetime.datetime.fromisoformat(text)
    assert t.utcoffset() == datetime.timedelta(0), text  # UTC
    return t


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from celltwin.data.columns import ObsColumns
    from celltwin.data.split_draw import make_split
    from celltwin.sim import simulate

    d = tmp_path_factory.mktemp("prov")
    adata = simulate("tiny")
    data = d / "screen.h5ad"
    adata.write_h5ad(data)
    make_split(adata.obs, ObsColumns(PERT_COL, CONTROL_LABEL, CONTEXT_COL, None), "context_1", holdout=0.5, seed=0,
               kind="fewshot", data_path=str(data)).write(d / "split.toml")
    return {"adata": adata, "data": data, "split": d / "split.toml"}


def test_provenance_fields():
    import numpy as np

    got = prov.run_provenance(started_at=prov.utc_now(), argv=["celltwin", "x"], device="cpu", precision="fp32",
                              files=[("data", ROOT / "pyproject.toml"), ("gone", ROOT / "no-such-file")])
    assert set(got) == KEYS and got["argv"] == ["celltwin", "x"] and got["precision"] == "fp32"
    v = got["package_versions"]
    assert {"celltwin", "numpy", "scipy", "anndata", "h5py", "numba", "polars"} <= set(v)
    assert v["numpy"] == np.__version__ and v["celltwin"] == __import__("celltwin").__version__
    assert ("torch" in v) == ("torch" in sys.modules)  # recorded only when imported, never imported for it
    host = got["host"]
    assert host["torch_device"] == "cpu" and host["python"] == ".".join(map(str, sys.version_info[:3]))
    assert host["cpu_count"] == os.cpu_count() and host["hostname"]
    if Path("/proc/cpuinfo").exists():
        assert host["cpu_model"]
    assert list(got["data_fingerprints"]) == [str(ROOT / "pyproject.toml")]  # a missing file is skipped
    from celltwin.data.inputs import file_fingerprint

    assert got["data_fingerprints"][str(ROOT / "pyproject.toml")] == {"role": "data",
                                                                     **file_fingerprint(ROOT / "pyproject.toml")}
    assert _when(got["started_at"]) <= _when(got["finished_at"])
    head = _head()
    if head is None:
        assert got["git_revision"] is None or prov.source_checkout() is None
    else:
        assert got["git_revision"] == head and isinstance(got["git_dirty"], bool)


def test_git_revision_never_fails(tmp_path, monkeypatch):
    assert prov.git_revision(tmp_path) == (None, None)  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert prov.git_revision(ROOT) == (None, None)


def test_provenance_module_does_not_import_torch():
    code = "import sys, celltwin._provenance as p; p.run_provenance(started_at=p.utc_now()); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# slow: a `python -m celltwin train` process (~5 s on 2 cores); the quick loop keeps the in-process
# run.json checks below and test_provenance_fields
@pytest.mark.slow
def test_train_cli_run_json_records_provenance(screen, tmp_path):
    """A baseline through the real command line: argv is what was passed, every input file is fingerprinted."""
    out = tmp_path / "run"
    args = ["train", "--model", "cell-mean", "--data", str(screen["data"]), "--split", str(screen["split"]),
            "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "celltwin", *args], capture_output=True, text=True, env=env,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "run.json").read_text())
    assert set(meta) >= KEYS
    assert meta["argv"][1:] == args and meta["argv"][0].endswith(("celltwin", "__main__.py"))
    assert _when(meta["started_at"]) <= _when(meta["finished_at"])
    fps = meta["data_fingerprints"]
    data, split = str(screen["data"].absolute()), str(screen["split"].absolute())
    assert fps[data]["role"] == "data" and fps[split]["role"] == "split"
    from celltwin.data.inputs import file_fingerprint

    assert {k: v for k, v in fps[data].items() if k != "role"} == file_fingerprint(screen["data"])
    assert meta["data_fingerprint"]["files"] == [file_fingerprint(screen["data"])]  # the resume key, unchanged
    assert meta["precision"] is None and meta["host"]["torch_device"] is None  # a baseline: no torch
    assert "torch" not in meta["package_versions"]
    head = _head()
    if head is not None:
        assert meta["git_revision"] == head


@pytest.mark.parametrize("native_bf16", [False, True])
def test_st_run_json_records_the_precision_auto_resolved_to(screen, tmp_path, monkeypatch, native_bf16):
    torch = pytest.importorskip("torch")
    from celltwin.runs import train_run
    from celltwin.train import loop

    torch.set_num_threads(1)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native_bf16)
    expected = "bf16" if native_bf16 else "fp32"
    assert loop._PRECISION_NAMES[loop.resolve_precision("auto", torch.device("cpu"))] == expected
    out = tmp_path / "st"
    meta = train_run("state", screen["adata"], out, options={**ST_SETS, "progress": "false", "device": "cpu"})
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["precision"] == meta["precision"] == meta["state"]["precision"] == expected
    assert on_disk["host"]["torch_device"] == "cpu"
    assert on_disk["package_versions"]["torch"] == torch.__version__
    assert "device" not in on_disk  # moved into host


def _train_argv(screen, out: Path, *flags: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in {**ST_SETS, "progress": "true"}.items()]
    return [*flags, "train", "--model", "state", "--data", str(screen["data"]), "--split", str(screen["split"]),
            "-o", str(out), *sets]


def test_quiet_hides_training_progress(screen, tmp_path, capsys):
    pytest.importorskip("torch")
    from celltwin import cli

    before = logging.getLogger("celltwin").level
    assert cli.main(_train_argv(screen, tmp_path / "loud")) == 0
    err = capsys.readouterr().err
    assert re.search(r"^step 3/3 loss \S+ \d+\.\d it/s$", err, re.MULTILINE), err
    assert cli.main(_train_argv(screen, tmp_path / "quiet", "-q")) == 0
    cap = capsys.readouterr()
    assert not re.search(r"^step \d+/", cap.err, re.MULTILINE), cap.err
    assert "trained state" in cap.out  # the result line is not logging: it stays
    assert logging.getLogger("celltwin").level == before  # main() leaves the levels as it found them


def test_log_levels_and_progress_flags():
    from celltwin import cli
    from celltwin.train.progress import progress_wanted

    lg = logging.getLogger("celltwin")
    for flags, own in (({"quiet": True}, logging.WARNING), ({}, logging.INFO), ({"verbose": True}, logging.DEBUG)):
        args = argparse.Namespace(no_progress=False, **flags)
        restore = cli._setup_logging(args)
        try:
            assert lg.level == own
            assert args.no_progress is bool(flags.get("quiet"))  # eval / embed / sim: --no-progress under -q
            assert progress_wanted() is (own <= logging.INFO)
        finally:
            restore()
    assert progress_wanted()  # an unset level (library use) keeps the progress
