"""On-disk numba compilation cache that is safe under concurrent processes and verified on load.

Every module of jitted kernels ends with ``_GUARDED = guard_numba_cache(globals())``, which
switches the on-disk cache of each of its ``cache=True`` dispatchers to :class:`_GuardedCacheFile`
(see the comment block below for why).
"""

from __future__ import annotations

import functools
import pickle

import numba as nb

__all__ = ["guard_numba_cache"]

# Why (the segfault of issue 10). numba 0.68.1 keeps one index per function
# (``<func>-<line>.pyXY.nbi``: key -> data-file name) and one data file per compiled signature
# (``<func>-<line>.pyXY.<n>.nbc``, pickled machine code). ``IndexDataCacheFile.save`` is an
# unlocked read-modify-write: load the index, pick the first unused number, write the index,
# write the data. Each single file is replaced atomically, but the *pair* is not: two processes
# that save different signatures (float32 / float64, C / A layout, or two versions of a kernel
# file while it is being edited) at the same moment both pick ``.1.nbc``; the index can end up
# naming process A's key while the data file holds process B's machine code. Nothing checks
# the loaded data against the key, and the dispatcher calls whatever entry point it got, with
# the caller's arrays. The boxing layer compares only the item size of each array, so a
# float64<->int64, float32<->int32 or 'C'<->'A' (e.g. a reversed view) mix-up, or code from
# another version of the file, runs on the wrong memory: out-of-bounds reads and writes, a
# segfault in every later process that loads that cache (deterministic until the cache is
# deleted). For a float32<->float64 mix-up the same corruption surfaces as "TypeError: can't
# unbox array". ``tests/eval/test_numba_cache.py`` forces that interleaving through numba's own
# ``save`` and shows the corrupted index, then checks the guard below repairs it.
#
# The guard (decided instead of a per-version cache directory, which would still be shared by
# concurrent processes of one version): every kernel's cache-file object is switched to
# :class:`_GuardedCacheFile`, which
#
# * takes an exclusive ``fcntl.flock`` on ``<cache dir>/celltwin-numba.lock`` around the whole
#   index-and-data update of ``save`` and a shared one around ``load`` (so readers never see a
#   half-updated pair); compilation itself is not serialised (concurrent cold processes may
#   compile the same kernel twice; the second save overwrites identical code);
# * stores each data file as ``(tag, numba, llvmlite, boundscheck, source stamp, key, payload)``
#   and, on load, ignores (and recompiles over) any entry whose header does not match this
#   process exactly: a foreign or pre-guard file, another signature, another source version,
#   another numba/llvmlite, or code compiled with a different ``NUMBA_BOUNDSCHECK`` (numba's own
#   key does not include that flag);
# * treats an unreadable (truncated) index as empty instead of raising.
#
# The cache location stays numba's choice (``NUMBA_CACHE_DIR`` if set, else ``__pycache__``
# next to the kernel's file, else a user-wide directory). Without ``fcntl`` (Windows) there is no lock
# and the header check alone keeps foreign code from running. If numba's cache classes ever
# change shape, the kernels fall back to no on-disk cache (compiled per process) rather than
# run unverified code.

_CACHE_TAG = "celltwin-numba-cache-1"
# what unpickling a damaged (truncated, garbled or foreign) file can raise
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)
_LOCK_NAME = "celltwin-numba.lock"


def _cache_header(stamp: object) -> tuple[object, ...]:
    import llvmlite

    return (_CACHE_TAG, nb.__version__, llvmlite.__version__, nb.config.BOUNDSCHECK, stamp)


def _flock(directory: str, exclusive: bool):
    """Context manager holding ``flock`` on ``directory/celltwin-numba.lock`` (no-op if impossible)."""
    import contextlib
    import os

    @contextlib.contextmanager
    def held():
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: header verification only
            yield
            return
        try:
            fd = os.open(os.path.join(directory, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # read-only or missing cache dir: header verification only
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    return held()


@functools.cache
def _make_guarded_class():
    from numba.core import caching

    base = caching.IndexDataCacheFile
    needed = ("save", "load", "_load_index", "_save_data", "_load_data", "_cache_path", "_source_stamp")

    class _GuardedCacheFile(base):
        """numba's index/data cache file with a cross-process lock and a verified header.

        ``save``/``load`` know the key, ``_save_data``/``_load_data`` only the file name, so the
        key is parked on the object for the duration of the call (numba holds its global
        compiler lock around both, so no other thread of this process interleaves).
        """

        _pending_key = None

        def save(self, key, data):
            with _flock(self._cache_path, exclusive=True):
                self._pending_key = key
                try:
                    super().save(key, data)
                finally:
                    self._pending_key = None

        def load(self, key):
            import os

            if not os.path.isdir(self._cache_path):
                return None
            with _flock(self._cache_path, exclusive=False):
                self._pending_key = key
                try:
                    return super().load(key)
                finally:
                    self._pending_key = None

        def _save_data(self, name, data):
            super()._save_data(name, (*_cache_header(self._source_stamp), self._pending_key, data))

        def _load_data(self, name):
            try:
                tup = super()._load_data(name)
            except OSError:
                raise  # numba's load() treats a vanished file as a miss
            except _UNPICKLE_ERRORS:  # truncated / garbled pickle: recompile, save overwrites it
                return None
            expected = _cache_header(self._source_stamp)
            n = len(expected)
            if not (isinstance(tup, tuple) and len(tup) == n + 2 and tup[:n] == expected):
                return None  # foreign / stale / pre-guard entry: recompile, save overwrites it
            if tup[n] != self._pending_key:
                return None  # the index names a file holding another key's code
            return tup[n + 1]

        def _load_index(self):
            try:
                return super()._load_index()
            except _UNPICKLE_ERRORS:  # truncated or garbled index: start afresh
                return {}

    return base, needed, _GuardedCacheFile


def guard_numba_cache(namespace: dict) -> list[str]:
    """Switch every ``cache=True`` dispatcher in ``namespace`` to the guarded cache file.

    Returns the names guarded. A dispatcher whose cache object does not look like numba
    0.60-0.68's gets no on-disk cache at all (``NullCache``) instead of an unverified one.
    """
    from numba.core import caching
    from numba.core.registry import CPUDispatcher

    base, needed, guarded = _make_guarded_class()
    names = []
    for name, obj in namespace.items():
        if not isinstance(obj, CPUDispatcher):
            continue
        cache = getattr(obj, "_cache", None)
        cf = getattr(cache, "_cache_file", None)
        if cf is None:
            continue
        if type(cf) is guarded:
            names.append(name)
        elif type(cf) is base and all(hasattr(cf, a) for a in needed):
            cf.__class__ = guarded
            names.append(name)
        else:  # pragma: no cover - a numba whose cache internals differ
            obj._cache = caching.NullCache()
    return names
