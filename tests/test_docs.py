"""The examples of the documentation run as written.

* ``docs/guide.md``: every ```python block, in order, in one namespace, in a temporary working
  directory; tracebacks name the guide's own line numbers. The guide names its data once, in the
  line ``DATA = "..."`` (and ``DATA=...`` in its shell blocks): the test points that line at the
  real file (``../shared/data/vcc2025_h1_subset.h5ad``) when it is there, else at a simulated
  screen with the same obs columns (as the guide says to do without the file). Setting
  ``CELLTWIN_DOCS_DATA=sim`` uses the simulated screen even when the real file is there.
  The slow variant also runs the ```bash blocks, in document order with the Python ones.
* ``README.md``, section "In a notebook": its ```python block, after :data:`README_SETUP` (the
  ``adata`` and the ``runs/linear`` run the block assumes, built here in plain sight).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
README = ROOT / "README.md"
REAL = ROOT.parent / "shared" / "data" / "vcc2025_h1_subset.h5ad"

FENCE = re.compile(r"^```(?P<lang>[A-Za-z]*)[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DATA_PY = re.compile(r'^DATA = "[^"\n]*"$', re.MULTILINE)
DATA_SH = re.compile(r"^DATA=\S+$", re.MULTILINE)


def blocks(text: str, langs: tuple[str, ...] = ("python",)) -> list[tuple[str, int, str]]:
    """``(lang, first line number of the code, code)`` of each fenced block whose language is in ``langs``."""
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") in langs:
            out.append((m.group("lang"), text.count("\n", 0, m.start("code")) + 1, m.group("code")))
    return out


def section(text: str, heading: str) -> str:
    """The text of the section under ``heading`` (a Markdown heading line), up to the next heading of any level."""
    start = text.index(f"{heading}\n")
    nxt = re.compile(r"^#{1,6} ", re.MULTILINE).search(text, start + len(heading) + 1)
    return text[start:nxt.start() if nxt else len(text)]


def _data_file(tmp_path: Path) -> Path:
    """The guide's data: the real file when present (and not overridden), else a simulated screen."""
    if REAL.exists() and os.environ.get("CELLTWIN_DOCS_DATA") != "sim":
        return REAL
    from celltwin.sim import SimConfig, simulate

    path = tmp_path / "data" / "screen.h5ad"
    path.parent.mkdir()
    simulate(SimConfig.preset("tiny", n_contexts=1)).write_h5ad(path)
    return path


def _with_data(code: str, lang: str, data: Path) -> str:
    if lang == "python":
        return DATA_PY.sub(lambda _m: f"DATA = {str(data)!r}", code)
    return DATA_SH.sub(lambda _m: f"DATA='{data}'", code)


def _run_python(code: str, line: int, ns: dict, where: Path) -> None:
    # padded so that line numbers in a traceback are the document's
    exec(compile("\n" * (line - 1) + code, str(where), "exec"), ns)


def _run_shell(code: str, line: int, cwd: Path) -> None:
    exe = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{exe}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    if shutil.which("celltwin", path=env["PATH"]) is None:
        pytest.skip("no celltwin command on PATH (install the package)")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, f"shell block at line {line} failed:\n{code}\n{proc.stderr[-3000:]}"


@pytest.fixture
def one_thread(monkeypatch):
    """Torch on one thread, as the other training tests (pytest -n 2 on two cores), and plots without a display."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)


def _run_guide(tmp_path: Path, monkeypatch, langs: tuple[str, ...]) -> dict:
    text = GUIDE.read_text(encoding="utf-8")
    found = blocks(text, langs)
    py = [b for b in found if b[0] == "python"]
    assert py, "docs/guide.md has no python block"
    assert sum(len(DATA_PY.findall(code)) for _, _, code in py) == 1, 'the guide must set DATA = "..." once'
    data = _data_file(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ns: dict = {"__name__": "__guide__"}
    for lang, line, code in found:
        if lang == "python":
            _run_python(_with_data(code, lang, data), line, ns, GUIDE)
        else:
            _run_shell(_with_data(code, lang, data), line, work)
    return ns


# slow: the whole guide (training, prediction, evaluation; ~10 s on 2 cores); the quick loop keeps
# the parsing check below (every block found, DATA named once)
@pytest.mark.slow
def test_guide_python_blocks_run(tmp_path, monkeypatch, one_thread):
    ns = _run_guide(tmp_path, monkeypatch, ("python",))
    # what the guide says it leaves behind
    assert "X_state" in ns["adata"].obsm and ns["adata"].obsm["X_state"].shape[0] == ns["adata"].n_obs
    assert set(ns["res_st"].results["perturbation"]) == set(ns["test"])
    assert ns["table"]["metric"].iloc[-1] == "avg_score"
    for name in ("eval_out/results.csv", "runs/st/run.json", "se_model"):
        assert Path(name).exists(), name


@pytest.mark.slow
def test_guide_with_shell_blocks_runs(tmp_path, monkeypatch, one_thread):
    _run_guide(tmp_path, monkeypatch, ("python", "bash"))
    for name in ("eval_out/agg_results.csv", "eval_by_celltype", "st_eval/results.csv", "st_score.csv",
                 "screen.se.h5ad"):
        assert Path(name).exists(), name


def test_guide_blocks_are_found_and_data_is_named_once():
    text = GUIDE.read_text(encoding="utf-8")
    assert len(blocks(text)) >= 6 and len(blocks(text, ("bash",))) == 3
    assert all(DATA_SH.search(code) for _, _, code in blocks(text, ("bash",)) if "$DATA" in code)
    assert sum(len(DATA_PY.findall(code)) for _, _, code in blocks(text)) == 1


# ----------------------------------------------------------------------------------- README
README_SETUP = '''
import numpy as np
import scipy.sparse as sp
import celltwin
from celltwin.sim import SimConfig, simulate

# the README block's `adata`: counts in layers["counts"] (X log1p-normalised), perturbations in
# obs["gene"] with controls "ctrl" (two of them named TP53 and MYC), cell lines in obs["cell_line"]
adata = simulate(SimConfig.preset("tiny"))
names = {"non-targeting": "ctrl"}
names.update(zip(sorted(set(adata.obs["target_gene"]) - {"non-targeting"})[:2], ["TP53", "MYC"]))
adata.obs["gene"] = [names.get(p, p) for p in adata.obs["target_gene"].astype(str)]
adata.obs["cell_line"] = adata.obs["context"].astype(str).map({"context_0": "K562", "context_1": "HepG2"})
adata.obs = adata.obs[["gene", "cell_line", "batch"]]
adata.layers["counts"] = adata.X.copy()
lib = np.asarray(adata.X.sum(1)).ravel()
adata.X = sp.csr_matrix(np.log1p(sp.diags(1e4 / lib) @ adata.X))
# the run the block loads
celltwin.LinearModel(adata, pert_col="gene", control_pert="ctrl", context_col="cell_line",
                     layer="counts").train().save("runs/linear")
'''


@pytest.mark.slow
def test_readme_notebook_block_runs(tmp_path, monkeypatch, one_thread):
    text = README.read_text(encoding="utf-8")
    found = blocks(section(text, "### In a notebook"))
    if not found:
        pytest.skip("the README's 'In a notebook' section has no python block")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    exec(compile(README_SETUP, "README_SETUP (tests/test_docs.py)", "exec"), ns)
    offset = text.count("\n", 0, text.index("### In a notebook\n"))
    for _, line, code in found:
        _run_python(code, line + offset, ns, README)
    assert Path("runs/st/run.json").exists() and "X_state" in ns["adata"].obsm
    assert ns["pred"].n_obs == 200 + 150 + int(((ns["adata"].obs["gene"] == "ctrl")
                                                   & (ns["adata"].obs["cell_line"] == "K562")).sum())


def test_top_level_evaluate_is_the_eval_package_s_and_torch_free():
    code = ("import sys, celltwin, celltwin.eval as ev\n"
            "assert celltwin.evaluate is ev.evaluate and celltwin.EvalConfig is ev.EvalConfig\n"
            "assert celltwin.evaluate_by_celltype is ev.evaluate_by_celltype\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
