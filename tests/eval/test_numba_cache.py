"""The numba on-disk cache of the DE kernels under concurrency, corruption and bounds checking.

Background (issue 10): numba 0.68.1 updates a function's cache index with an unlocked
read-modify-write, so two processes saving different signatures at once can leave an index
entry that names a data file holding *another* signature's machine code; numba calls it
without checking. celltwin's guard (``celltwin/eval/_numba_cache.py``) locks the update
and verifies a header (celltwin tag, numba/llvmlite versions, boundscheck flag, source stamp,
full key) on every load.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from celltwin.eval import _bh, _gather, _means, _mwu, _mwu_legacy, _numba_cache, _pairwise

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_numba_cache_worker.py"
ROOT = HERE.parents[1]


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(NUMBA_CACHE_DIR=str(cache_dir), NUMBA_NUM_THREADS="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _run_workers(n: int, cache_dir: Path, out_dir: Path, tag: str) -> list[dict[str, np.ndarray]]:
    procs = []
    for i in range(n):
        out = out_dir / f"{tag}{i}.npz"
        p = subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env=_env(cache_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append((p, out))
    results = []
    for p, out in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log.decode()[-3000:]
        with np.load(out) as z:
            results.append({k: z[k] for k in z.files})
    return results


def _reference() -> dict[str, np.ndarray]:
    sys.path.insert(0, str(HERE))
    try:
        import _numba_cache_worker as w
    finally:
        sys.path.remove(str(HERE))
    return w.compute()


def _assert_same(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _read_index(path: Path) -> tuple[object, object, dict]:
    with open(path, "rb") as fh:
        version = pickle.load(fh)
        stamp, overloads = pickle.loads(fh.read())
    return version, stamp, overloads


def _write_index(path: Path, version: object, stamp: object, overloads: dict) -> None:
    from numba.core.serialize import dumps

    with open(path, "wb") as fh:
        pickle.dump(version, fh, protocol=-1)
        fh.write(dumps((stamp, overloads)))


@pytest.mark.slow
def test_concurrent_cold_cache_runs_agree(tmp_path):
    """Three evaluations start at once on ONE empty cache dir, then three more on the warm one."""
    cache = tmp_path / "numba"
    ref = _reference()
    assert np.isfinite(ref["dense64.p_value"]).all() and (ref["dense64.p_value"] < 0.01).any()
    cold = _run_workers(3, cache, tmp_path, "cold")
    warm = _run_workers(3, cache, tmp_path, "warm")
    for got in (*cold, *warm):
        _assert_same(got, ref)
    # every mwu_block signature is in the index once, each data file holds exactly its key
    (index,) = cache.glob("*/_mwu.mwu_block-*.nbi")
    _, _, overloads = _read_index(index)
    assert len(overloads) == 2 and len(set(overloads.values())) == 2
    n_hdr = len(_numba_cache._cache_header(None))
    for key, name in overloads.items():
        with open(index.parent / name, "rb") as fh:
            tup = pickle.loads(fh.read())
        assert tup[0] == _numba_cache._CACHE_TAG and tup[n_hdr] == key


# slow: two cold-cache worker processes compile every kernel (~70 s on 2 busy cores); the guard's
# rejection of an index entry naming another key's data is unit-tested in-process below
@pytest.mark.slow
def test_index_naming_another_signatures_code_is_recompiled(tmp_path):
    """The end state of numba's save race: the float64 key points at float32 machine code.

    Without the guard the next process calls the float32 entry point with float64 arrays
    ("can't unbox array"; for equal item sizes it reads and writes out of bounds).
    """
    cache = tmp_path / "numba"
    ref = _reference()
    _assert_same(_run_workers(1, cache, tmp_path, "first")[0], ref)
    (index,) = cache.glob("*/_mwu.mwu_block-*.nbi")
    version, stamp, overloads = _read_index(index)
    by_dtype = {str(key[0][1].dtype): (key, name) for key, name in overloads.items()}
    key64, _ = by_dtype["float64"]
    _, name32 = by_dtype["float32"]
    _write_index(index, version, stamp, {key64: name32})
    _assert_same(_run_workers(1, cache, tmp_path, "after")[0], ref)
    _, _, repaired = _read_index(index)
    with open(index.parent / repaired[key64], "rb") as fh:
        assert pickle.loads(fh.read())[len(_numba_cache._cache_header(None))] == key64


def _guarded_file(tmp_path: Path):
    _base, _needed, guarded = _numba_cache._make_guarded_class()
    tmp_path.mkdir(parents=True, exist_ok=True)
    return guarded(str(tmp_path), "probe-1.py3", source_stamp="stamp-a")


def test_guarded_cache_file_roundtrip_and_rejections(tmp_path):
    cf = _guarded_file(tmp_path)
    cf.save(("sig-a", "magic"), {"payload": 1})
    cf.save(("sig-b", "magic"), {"payload": 2})
    assert cf.load(("sig-a", "magic")) == {"payload": 1}
    assert cf.load(("sig-b", "magic")) == {"payload": 2}
    assert cf.load(("sig-c", "magic")) is None
    names = cf._load_index()
    # swap the index entries: each key now names the other key's data -> both rejected
    cf._save_index(
        {("sig-a", "magic"): names[("sig-b", "magic")], ("sig-b", "magic"): names[("sig-a", "magic")]}
    )
    assert cf.load(("sig-a", "magic")) is None and cf.load(("sig-b", "magic")) is None
    # a data file without the celltwin header (numba's plain format, e.g. a pre-fix cache)
    base_cls = type(cf).__mro__[1]
    base_cls._save_data(cf, names[("sig-a", "magic")], {"payload": "foreign"})
    cf._save_index({("sig-a", "magic"): names[("sig-a", "magic")]})
    assert cf.load(("sig-a", "magic")) is None
    # another source version of the file
    other = type(cf)(str(tmp_path), "probe-1.py3", source_stamp="stamp-b")
    cf.save(("sig-a", "magic"), {"payload": 3})
    assert other.load(("sig-a", "magic")) is None and cf.load(("sig-a", "magic")) == {"payload": 3}
    # garbage data file and truncated index: a miss, not a traceback
    Path(cf._data_path(names[("sig-a", "magic")])).write_bytes(b"\x80\x05garbage")
    assert cf.load(("sig-a", "magic")) is None
    Path(cf._index_path).write_bytes(Path(cf._index_path).read_bytes()[:7])
    assert cf.load(("sig-a", "magic")) is None
    cf.save(("sig-a", "magic"), {"payload": 4})  # and the entry is rewritten
    assert cf.load(("sig-a", "magic")) == {"payload": 4}


def test_guarded_save_waits_for_the_cache_lock(tmp_path):
    cf = _guarded_file(tmp_path)
    fd = os.open(tmp_path / _numba_cache._LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as if another process were updating the index
    done = threading.Event()
    t = threading.Thread(target=lambda: (cf.save(("k", "m"), [1, 2]), done.set()))
    t.start()
    time.sleep(0.5)
    assert not done.is_set() and not Path(cf._index_path).exists()
    os.close(fd)  # releases the lock
    t.join(10)
    assert done.is_set() and cf.load(("k", "m")) == [1, 2]


@pytest.mark.slow
def test_kernels_in_bounds_under_boundscheck(tmp_path):
    """Kernel tests (edge cases included) with numba's bounds checking compiled in.

    A fresh cache dir is essential: numba's cache key does not include NUMBA_BOUNDSCHECK, and
    the guard's header rejects code compiled with a different setting anyway.
    """
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        str(HERE / "test_kernels.py"),
        "-k",
        "mwu or distinct or bucket or csr_block or bh_hand",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(
        cmd,
        env=_env(tmp_path / "numba-bc", NUMBA_BOUNDSCHECK="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
    assert time.perf_counter() - t0 < 300


def test_no_kernel_uses_numbas_argsort():
    """The kernels must not mix numba's ``np.sort`` and ``np.argsort`` helpers.

    numba names the helpers of both after the same factory (``make_quicksort_impl.<locals>.
    run_quicksort`` for the same argument types) plus a per-process counter, so an argsort helper
    compiled in one process and a sort helper compiled in another can share a symbol name, and a
    process that loads both from the on-disk cache links one in place of the other: a shared
    cache written by concurrent processes gave wrong p-values and a segfault in ``bh_rows``
    (rank-sum kernel and BH kernel cached by different processes). BH therefore sorts with
    ``_bh._argsort_nan_last``; this checks the compiled code of every kernel signature used
    by a DE table for numba's argsort implementation.
    """
    sys.path.insert(0, str(HERE))
    try:
        import _numba_cache_worker as w
    finally:
        sys.path.remove(str(HERE))
    w.compute()  # compiles (or loads) every v2 kernel signature of dense64 / dense32 / csr32
    seen = 0
    dispatchers = {
        (mod.__name__, name): getattr(mod, name)
        for mod in (_gather, _mwu, _mwu_legacy, _means, _bh, _pairwise)
        for name in dir(mod)
    }
    for (mod_name, name), disp in dispatchers.items():
        if not hasattr(disp, "inspect_llvm") or not getattr(disp, "signatures", None):
            continue
        for sig, ir in disp.inspect_llvm().items():
            seen += 1
            assert "array_argsort" not in ir, f"{mod_name}.{name}{sig} uses numba's argsort"
    assert seen >= 10
