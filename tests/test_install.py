"""Installation: optional extras fail with one line, and celltwin[models] installs beside arc-state.

* ``celltwin genes embed`` without torch / transformers (the ``genes`` extra): one line naming the
  missing package and ``pip install 'celltwin[genes]'``, exit code 2 (the module is made unimportable
  through ``sys.modules``, so the real import statement is exercised).
* ``pip install --dry-run --report`` resolves ``celltwin[models]`` (this checkout) together with
  ``arc-state==0.11.1``, ``cell-eval==0.8.2`` and ``scanpy`` into a throwaway venv whose only
  package is the torch this test runs with (its real metadata): the resolution must succeed, keep
  that torch (no CUDA build pulled in) and that torch must satisfy both celltwin's and arc-state's
  requirements. Nothing is installed anywhere. Needs the package index (skipped when unreachable);
  slow because pip downloads the wheels whose metadata the index does not serve separately
  (about 150 MB without a pip cache; about a minute on the 2-core development machine).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import types
import venv
from pathlib import Path

import pytest

from celltwin.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- optional extras, one line


@pytest.mark.parametrize("missing", ["transformers", "torch"])
def test_genes_embed_without_its_extra_is_one_line(missing, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import transformers` -> ModuleNotFoundError
    fa = tmp_path / "p.fa"
    fa.write_text(">A\nMKV\n")
    (tmp_path / "esm").mkdir()
    out = tmp_path / "g.safetensors"
    rc = main(["genes", "embed", "--fasta", str(fa), "--model", str(tmp_path / "esm"), "-o", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("celltwin genes embed: error: ")
    assert f"optional package '{missing}', which is not installed" in err
    assert err.rstrip().endswith("pip install 'celltwin[genes]'")
    assert not out.exists()


def test_genes_embed_with_a_broken_transformers_names_the_cause(monkeypatch, tmp_path, capsys):
    # a transformers without EsmModel (too old, or broken): not "not installed", and the cause is named
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    fa = tmp_path / "p.fa"
    fa.write_text(">A\nMKV\n")
    (tmp_path / "esm").mkdir()
    rc = main(["genes", "embed", "--fasta", str(fa), "--model", str(tmp_path / "esm"),
               "-o", str(tmp_path / "g.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert "importing them failed (ImportError: cannot import name 'EsmModel'" in err
    assert "pip install -U 'celltwin[genes]'" in err


# ------------------------------------------------------------- resolution beside arc-state

_BESIDE = ["arc-state==0.11.1", "cell-eval==0.8.2", "scanpy"]


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONWARNINGS="ignore")
    return env


def _pip(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env or _pip_env())


def _torch_requirements(metadata: dict, extras: set[str]):
    """The ``torch`` specifiers of a report entry's ``requires_dist`` that apply with ``extras``."""
    from packaging.requirements import Requirement

    out = []
    for line in metadata.get("requires_dist", []):
        req = Requirement(line)
        if req.name.lower() != "torch":
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            out.append(req.specifier)
    return out


@pytest.mark.slow
def test_models_extra_resolves_beside_arc_state_cell_eval_scanpy(tmp_path):
    try:
        pip_version = importlib.metadata.version("pip")
        torch_dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError as e:
        pytest.skip(f"needs pip and torch in the test environment ({e.name} is not installed)")
    if int(pip_version.split(".")[0]) < 23:
        pytest.skip(f"needs pip >= 23 (--dry-run --report --python), have {pip_version}")

    # Is the package index reachable? One small download, no retries, short timeout.
    probe_env = {**_pip_env(), "PIP_RETRIES": "0", "PIP_TIMEOUT": "20"}
    try:
        probe = _pip("download", "--no-deps", "-q", "-d", str(tmp_path / "probe"), "arc-state==0.11.1",
                     timeout=90, env=probe_env)
    except subprocess.TimeoutExpired:
        pytest.skip("package index unreachable (timeout fetching arc-state==0.11.1)")
    if probe.returncode != 0:
        pytest.skip(f"package index unreachable: {probe.stderr.strip().splitlines()[-1:]}")

    # A throwaway venv holding only the torch we run with (its metadata: pip sees it installed and,
    # since it satisfies every requirement, keeps it; no torch wheel is downloaded).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    info = site / f"torch-{torch_dist.version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(torch_dist.read_text("METADATA"))
    (info / "INSTALLER").write_text("celltwin-test\n")
    (info / "RECORD").write_text("")

    report = tmp_path / "report.json"
    try:
        res = _pip("--python", str(py), "install", "--dry-run", "--quiet", "--report", str(report),
                   f"{ROOT}[models]", *_BESIDE, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("pip's resolution took more than 10 minutes")
    assert res.returncode == 0, f"pip could not resolve celltwin[models] with {_BESIDE}:\n{res.stderr[-4000:]}"

    items = {it["metadata"]["name"].lower().replace("_", "-"): it for it in json.loads(report.read_text())["install"]}
    for name, version in (("arc-state", "0.11.1"), ("cell-eval", "0.8.2"), ("celltwin", "0.1.0")):
        assert items[name]["metadata"]["version"] == version
    assert "scanpy" in items
    assert items["celltwin"]["requested_extras"] == ["models"]
    # the installed torch was kept: no other torch, no CUDA runtime pulled in beside it
    assert "torch" not in items, f"pip wants torch {items['torch']['metadata']['version']} instead"
    assert not [n for n in items if n.startswith("nvidia-")], sorted(items)

    ours = _torch_requirements(items["celltwin"]["metadata"], {"models"})
    theirs = _torch_requirements(items["arc-state"]["metadata"], set())
    assert ours and theirs  # both really ask for torch
    for spec in ours + theirs:
        assert spec.contains(torch_dist.version, prereleases=True), (torch_dist.version, str(spec))
