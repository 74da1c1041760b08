"""The evaluation report (celltwin.eval._report): bounded figures at 300 perturbations, a
self-contained report.html (parsed, and rendered by a real browser when one is installed)."""

from __future__ import annotations

import html.parser
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ad = pytest.importorskip("anndata")

from celltwin.eval import EvalConfig, evaluate
from celltwin.eval._report import DPI, MAX_FIGSIZE, TOP_K, rank_perturbations

CTRL = "non-targeting"
COL = "target_gene"
N_PERTS = 300
MAX_PX = (int(MAX_FIGSIZE[0] * DPI), int(MAX_FIGSIZE[1] * DPI))  # 1320 x 880


def _screen(seed: int, n_perts: int = N_PERTS, n_genes: int = 12, cells: int = 3) -> ad.AnnData:
    """``n_perts`` perturbations (some with long names) x ``cells`` cells, 30 controls, few genes."""
    rng = np.random.default_rng(seed)
    perts = [f"PERT{i:03d}" + ("_with_a_rather_long_descriptive_name" if i % 50 == 0 else "") for i in range(n_perts)]
    base = rng.gamma(2.0, 2.0, n_genes)
    blocks, labels = [rng.poisson(base, (30, n_genes))], [CTRL] * 30
    for i, p in enumerate(perts):
        mu = base.copy()
        mu[i % n_genes] *= 3.0 + (i % 7)
        blocks.append(rng.poisson(mu, (cells, n_genes)))
        labels += [p] * cells
    a = ad.AnnData(sp.csr_matrix(np.vstack(blocks).astype(np.float32)))
    a.obs[COL] = pd.Categorical(labels)
    a.var_names = [f"G{i}" for i in range(n_genes)]
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = evaluate(_screen(1), _screen(0), config=EvalConfig(progress=False))
    t0 = time.perf_counter()
    paths = res.write(out, de_format="none")
    return res, out, paths, time.perf_counter() - t0


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_are_bounded_at_300_perturbations(report):
    res, out, paths, seconds = report
    names = {p.name for p in paths}
    metrics = [c for c in res.results.columns if c != "perturbation"]
    assert len(res.results) == N_PERTS
    expected = {"report.md", "report.html", "scores.png", "effects.png", "de_counts.png"}
    expected |= {f"ranking_{m}.png" for m in metrics}
    assert expected <= names, names
    from celltwin.eval._evaluate import OUTPUT_NAMES

    assert names <= OUTPUT_NAMES  # a later run replaces or removes every file of this one
    for p in out.glob("*.png"):
        w, h = _png_size(p)
        assert 100 <= w <= MAX_PX[0] and 100 <= h <= MAX_PX[1], (p.name, w, h)
        assert p.stat().st_size < 400_000, (p.name, p.stat().st_size)
    assert (out / "report.html").stat().st_size < 3_000_000
    assert seconds < 60


def test_rank_perturbations_direction_ties_and_nan():
    names = np.array(["d", "a", "c", "b", "e"])
    v = np.array([0.5, 0.9, np.nan, 0.9, 0.1])
    hi = rank_perturbations(v, names, True, k=2)
    assert names[hi.best].tolist() == ["a", "b"] and names[hi.worst].tolist() == ["e", "d"] and hi.n_valid == 4
    lo = rank_perturbations(v, names, False, k=2)  # lower is better (mae)
    assert names[lo.best].tolist() == ["e", "d"] and names[lo.worst].tolist() == ["a", "b"]
    assert lo.words == ("best", "worst") and rank_perturbations(v, names, None).words == ("highest", "lowest")


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_lists_best_and_worst(report):
    res, out, _, _ = report
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    tags = [t for t, _ in page.tags]
    assert "title" in tags and "script" not in tags and "link" not in tags and "iframe" not in tags
    imgs = [a for t, a in page.tags if t == "img"]
    metrics = [c for c in res.results.columns if c != "perturbation"]
    assert len(imgs) == 3 + len(metrics)  # distributions, one ranking per metric, effects, DE counts
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert all(not a.get(k, "").startswith(("http", "//")) for _, a in page.tags for k in ("src", "href"))
    text = "\n".join(page.text)
    perts = res.results["perturbation"].astype(str).to_numpy()
    for m in metrics:
        from celltwin.eval._report import _direction

        rk = rank_perturbations(res.results[m].to_numpy(dtype=float), perts, _direction(m)[0], TOP_K)
        for i in np.concatenate([rk.best, rk.worst]):
            assert perts[i] in text, (m, perts[i])
    # every perturbation is in the per-perturbation table, full names included
    assert "PERT050_with_a_rather_long_descriptive_name" in text
    assert sum(t == "tr" for t in tags) >= N_PERTS + 1 + len(metrics)


def test_html_escapes_names_and_keeps_prefix(tmp_path):
    real, pred = _screen(0, n_perts=5), _screen(1, n_perts=5)
    for a in (real, pred):
        a.obs[COL] = a.obs[COL].cat.rename_categories(lambda c: c if c == CTRL else f"<b>{c}&x</b>")
    res = evaluate(pred, real, config=EvalConfig(profile="pds", progress=False))
    names = {p.name for p in res.write(tmp_path, prefix="K562", de_format="none")}
    assert {"K562_report.html", "K562_report.md", "K562_scores.png", "K562_effects.png",
            "K562_ranking_discrimination_score_l1.png"} <= names
    assert "K562_de_counts.png" not in names  # no DE in the pds profile
    text = (tmp_path / "K562_report.html").read_text()
    assert "<b>PERT001" not in text and "&lt;b&gt;PERT001&amp;x&lt;/b&gt;" in text
    assert "](K562_scores.png)" in (tmp_path / "K562_report.md").read_text()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# slow: two headless chromium runs (~6 s); the quick loop keeps the checks of the HTML itself
@pytest.mark.slow
def test_report_renders_in_a_real_browser(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH: the headless browser rendering check needs one "
                    "(.ci/run installs chromium when it can)")
    _, out, _, _ = report
    url = (out / "report.html").resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True,
                       text=True, timeout=120, env=env, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000, (r.returncode, r.stderr[-2000:])
    assert _png_size(shot) == (1200, 2000)
    import matplotlib.image

    px = matplotlib.image.imread(str(shot))[..., :3]  # float RGB in [0, 1]
    # the page's text and tables are black / grey: coloured pixels (histogram and ranking bars) come
    # only from the figures, so they show that the data: URIs were decoded and drawn
    colourful = (px.max(axis=-1) - px.min(axis=-1)) > 0.2
    assert colourful.sum() > 20_000, int(colourful.sum())
    r = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, env=env,
                       check=False)
    dom = r.stdout
    assert r.returncode == 0 and "<title>celltwin evaluation report</title>" in dom, r.stderr[-2000:]
    assert 'id="summary-table"' in dom and 'id="per-perturbation-table"' in dom
    assert dom.count('src="data:image/png;base64,') >= 4
    assert "PERT050_with_a_rather_long_descriptive_name" in dom
