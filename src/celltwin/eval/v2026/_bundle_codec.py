"""What the VCC 2026 reference bundle writes besides its manifest: values made JSON-able for the
identity and ``scale.json`` (:func:`_jsonable`), and the prepared reference statistics
(``_metrics.RealStats``) as ``real_stats.npz`` - arrays in the archive, their structure as JSON
inside it, no pickle (:func:`_save_stats` / :func:`_load_stats`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return repr(x)


def _save_stats(d: Path, stats: Any) -> None:
    """Store the prepared reference statistics (``_metrics.RealStats``) as ``real_stats.npz``:
    arrays in the archive, the structure as JSON inside it (no pickle). The reference matrix itself
    (``RealStats.side``) is not stored: it is rebuilt from the reference on load. Anything else (or
    a structure this encoder does not know) is not stored and is recomputed per run."""
    from celltwin.eval.v2026._metrics import RealStats

    if not isinstance(stats, RealStats):
        return
    arrays: dict[str, np.ndarray] = {}
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if f.name != "side"}
    try:
        tree = {k: _encode(v, arrays) for k, v in fields.items()}
    except _Unserialisable as e:
        logger.debug("bundle: prepared statistics not stored (%s); they are recomputed per run", e)
        return
    arrays["__tree__"] = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
    with open(d / "real_stats.npz", "wb") as fh:
        np.savez(fh, **arrays)


def _load_stats(d: Path, real: Any) -> Any:
    """The stored ``RealStats`` of the context ``real`` (its matrix rebuilt from ``real``), or
    ``None`` when absent or unreadable (then recomputed: it is a cache of derived data)."""
    from celltwin.eval.v2026._metrics import RealStats
    from celltwin.eval.v2026._sides import _side

    f = d / "real_stats.npz"
    if not f.exists():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        tree = json.loads(arrays.pop("__tree__").tobytes().decode())
        fields = {k: _decode(v, arrays) for k, v in tree.items()}
        side = _side(real, "reference", list(fields["genes"]))
        return RealStats(side=side, **fields)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, _Unserialisable) as e:
        logger.warning("bundle: %s unreadable (%s); recomputing the prepared statistics", f, e)
        return None


class _Unserialisable(Exception):
    pass


def _encode(x: Any, arrays: dict[str, np.ndarray]) -> Any:
    import pandas as pd

    if x is None or isinstance(x, bool | int | str):
        return {"t": "v", "v": x}
    if isinstance(x, float):
        return {"t": "f", "v": repr(x)}
    if isinstance(x, np.generic):
        return _encode(x.item(), arrays)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufcUS":
            raise _Unserialisable(f"array of dtype {x.dtype}")
        key = f"a{len(arrays)}"
        arrays[key] = x
        return {"t": "a", "k": key}
    if sp.issparse(x):
        m = sp.csr_matrix(x)
        return {
            "t": "csr",
            "shape": list(m.shape),
            "fmt": getattr(x, "format", "csr"),
            "parts": [_encode(m.data, arrays), _encode(m.indices, arrays), _encode(m.indptr, arrays)],
        }
    if isinstance(x, pd.DataFrame):
        cols = [str(c) for c in x.columns]
        if len(set(cols)) != len(cols):
            raise _Unserialisable("duplicate DataFrame columns")
        return {
            "t": "df",
            "cols": cols,
            "index": _encode(np.asarray(x.index), arrays),
            "data": [_encode(np.asarray(x[c]), arrays) for c in x.columns],
        }
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        cls = type(x)
        return {
            "t": "dc",
            "cls": f"{cls.__module__}:{cls.__qualname__}",
            "f": {f.name: _encode(getattr(x, f.name), arrays) for f in dataclasses.fields(x) if f.init},
        }
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise _Unserialisable("dict with non-string keys")
        return {"t": "d", "v": {k: _encode(v, arrays) for k, v in x.items()}}
    if isinstance(x, list | tuple):
        return {"t": "l" if isinstance(x, list) else "tu", "v": [_encode(v, arrays) for v in x]}
    raise _Unserialisable(type(x).__name__)


def _decode(t: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    import importlib

    import pandas as pd

    kind = t["t"]
    if kind == "v":
        return t["v"]
    if kind == "f":
        return float(t["v"])
    if kind == "a":
        return arrays[t["k"]]
    if kind == "csr":
        data, indices, indptr = (_decode(p, arrays) for p in t["parts"])
        m = sp.csr_matrix((data, indices, indptr), shape=tuple(t["shape"]))
        return m.asformat(t.get("fmt", "csr"))
    if kind == "df":
        cols = {c: _decode(v, arrays) for c, v in zip(t["cols"], t["data"], strict=True)}
        return pd.DataFrame(cols, index=_decode(t["index"], arrays))
    if kind == "dc":
        mod, _, qual = t["cls"].partition(":")
        if not mod.startswith("celltwin."):
            raise _Unserialisable(f"class {t['cls']} outside celltwin")
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj(**{k: _decode(v, arrays) for k, v in t["f"].items()})
    if kind == "d":
        return {k: _decode(v, arrays) for k, v in t["v"].items()}
    if kind in ("l", "tu"):
        vals = [_decode(v, arrays) for v in t["v"]]
        return vals if kind == "l" else tuple(vals)
    raise _Unserialisable(kind)
