"""Integrity of the on-disk DE-table cache (celltwin.eval._de_cache): entries are verified by a
SHA-256 of their payload; anything that does not verify is ignored, recomputed and rewritten."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin.eval import _de_cache
from celltwin.eval._de import de_table
from celltwin.eval._de_cache import DECacheWarning


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(5)
    labels = np.array(["ctrl"] * 80 + ["a"] * 30 + ["b"] * 30)
    X = np.log1p(rng.poisson(rng.gamma(1.0, 1.5, size=25), size=(labels.size, 25))).astype(np.float32)
    X[80:110, :4] += 1.0
    genes = [f"g{i}" for i in range(25)]
    fresh = de_table(sp.csr_matrix(X), labels, "ctrl", genes)
    assert (fresh.p_value < 1e-3).any()
    return sp.csr_matrix(X), labels, genes, fresh


def _entry(tmp_path: Path, small) -> Path:
    X, labels, genes, fresh = small
    with warnings.catch_warnings():
        warnings.simplefilter("error", DECacheWarning)
        first = de_table(X, labels, "ctrl", genes, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, fresh)
    (path,) = tmp_path.glob("*.npz")
    return path


def _reload_checks(tmp_path: Path, small, path: Path, match: str) -> None:
    X, labels, genes, fresh = small
    with pytest.warns(DECacheWarning, match=match):
        got = de_table(X, labels, "ctrl", genes, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(got, fresh)  # recomputed: equal to the fresh computation
    with warnings.catch_warnings():  # ... and rewritten: verifies again, served from the cache
        warnings.simplefilter("error", DECacheWarning)
        again = de_table(X, labels, "ctrl", genes, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, fresh)
    assert [p.name for p in tmp_path.glob("*.npz")] == [path.name]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_entry_layout_has_verified_metadata(tmp_path, small):
    path = _entry(tmp_path, small)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    assert meta["format"] == _de_cache.DE_CACHE_VERSION
    assert meta["key"] == path.stem
    assert meta["columns"] == list(small[3].columns)
    assert meta["sha256"] == _de_cache._payload_digest(arrays) and len(meta["sha256"]) == 64
    assert all(a.dtype != object for a in arrays.values())


def test_edited_entry_is_detected_and_recomputed(tmp_path, small):
    path = _entry(tmp_path, small)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["p_value"] = np.zeros_like(arrays["p_value"])  # metadata (and its digest) kept as is
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    _reload_checks(tmp_path, small, path, "SHA-256")


def test_single_flipped_byte_is_detected(tmp_path, small):
    path = _entry(tmp_path, small)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    stat = arrays["statistic"].copy()
    stat.view(np.uint8)[3] ^= 1  # last-bit change of one U statistic
    assert not np.array_equal(stat, arrays["statistic"])
    arrays["statistic"] = stat
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    _reload_checks(tmp_path, small, path, "SHA-256")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_garbage_entry_is_recomputed(tmp_path, small, damage):
    path = _entry(tmp_path, small)
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    _reload_checks(tmp_path, small, path, "unreadable npz")


def test_missing_or_malformed_metadata_and_foreign_key(tmp_path, small):
    path = _entry(tmp_path, small)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    no_meta = {k: v for k, v in arrays.items() if k != "__meta__"}
    with open(path, "wb") as fh:
        np.savez(fh, **no_meta)  # the pre-integrity layout
    _reload_checks(tmp_path, small, path, "__meta__")
    bad = dict(arrays, __meta__=np.frombuffer(b"{not json", dtype=np.uint8))
    with open(path, "wb") as fh:
        np.savez(fh, **bad)
    _reload_checks(tmp_path, small, path, "malformed metadata")
    # a valid entry of another key copied over this one
    meta = json.loads(arrays["__meta__"].tobytes())
    meta["key"] = "0" * 40
    other = dict(arrays, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    with open(path, "wb") as fh:
        np.savez(fh, **other)
    _reload_checks(tmp_path, small, path, "key")


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CT_PICKLE_MARKER"]),))


def test_loading_never_unpickles(tmp_path, small, monkeypatch):
    path = _entry(tmp_path, small)
    marker = tmp_path / "pickle-ran"
    monkeypatch.setenv("CT_PICKLE_MARKER", str(marker))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["p_value"] = np.array([_Boom()], dtype=object)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # an object array is stored pickled
    _reload_checks(tmp_path, small, path, "unreadable npz")
    assert not marker.exists()


def test_valid_entry_is_really_what_is_returned(tmp_path, small):
    """A consistent entry (written through save) is served as is: the cache is really used."""
    X, labels, genes, fresh = small
    path = _entry(tmp_path, small)
    doctored = fresh.copy()
    doctored["p_value"] = 0.25
    assert _de_cache.save(tmp_path, path.stem, doctored) == path
    with warnings.catch_warnings():
        warnings.simplefilter("error", DECacheWarning)
        got = de_table(X, labels, "ctrl", genes, cache_dir=tmp_path)
    assert (got.p_value == 0.25).all()
    pd.testing.assert_frame_equal(got.drop(columns="p_value"), fresh.drop(columns="p_value"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unwritable_cache_dir_only_warns(tmp_path, small):
    X, labels, genes, fresh = small
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.warns(DECacheWarning, match="not written"):
            got = de_table(X, labels, "ctrl", genes, cache_dir=ro)
    finally:
        ro.chmod(0o755)
    pd.testing.assert_frame_equal(got, fresh)
