"""The reference bundle: a context's scale ends ``b`` and ``r``, computed once and reused.

Building the scale of a context costs one baseline scoring run, five split-half scoring runs and
fifteen extra DE passes (:mod:`celltwin.eval.v2026._scale`); all of it reads the reference alone,
so it is the same for every submission. A bundle stores it on disk, in a directory the user
names (``celltwin eval --profile vcc2026 --bundle PATH``)::

    PATH/manifest.json               format, identity of the reference and of the configuration
    PATH/ctx-000/scale.json          b, r, the five per-split values, seeds, cohort sizes
    PATH/ctx-000/baseline_results.csv  the baseline's per-perturbation values (for inspection)
    PATH/ctx-000/real_stats.npz      the prepared reference-side statistics (profiles, jackknife
                                     corrections, the reference DE table; no pickle), so a reused
                                     bundle scores a submission without re-running the reference DE

Identity. A bundle is keyed by

* a content digest of every context of the reference: sha256 over the context name, the gene
  names, every cell's perturbation label (in file order: the cell order decides the baseline's
  draws and the replicate's halves) and the CSR matrix in canonical form (rows in order, columns
  sorted, explicit zeros and duplicate entries folded, values as float64). Two files holding the
  same cells in the same order share a digest whatever their encoding; any other change of the
  data changes it;
* a digest of the configuration: the metric parameters (``V2026Config``), the control label, the
  target-gene map, the base seed, the number of splits, the baseline seed and
  :data:`SEMANTICS_VERSION` (bumped whenever celltwin's numbers for the same inputs change).

Opening a bundle whose configuration digest differs, or whose contexts or context digests differ
from the reference being scored, is refused with a message naming the difference: a scale from
other data or other parameters would give plausible, wrong scores. A missing bundle is built and
written atomically (all files appear at once); an existing bundle is never modified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026 import _scale as S

__all__ = [
    "BUNDLE_FORMAT",
    "SEMANTICS_VERSION",
    "BundleMismatchError",
    "BundleWriter",
    "ContextScale",
    "ReferenceBundle",
    "build_context_scale",
    "config_identity",
    "context_digest",
    "digest_of",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "celltwin-vcc2026-reference-bundle"
BUNDLE_VERSION = 1
#: Bump when celltwin computes different ``b`` / ``r`` for the same inputs and configuration.
SEMANTICS_VERSION = 1
MANIFEST = "manifest.json"


class BundleMismatchError(InputError):
    """A bundle built from other reference data or another configuration."""


# ---------------------------------------------------------------------------------------------
# identity


def _h_array(h: Any, a: np.ndarray, dtype: Any) -> None:
    a = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    h.update(str(a.shape).encode())
    h.update(a.tobytes())


def context_digest(cc: Any, context: str | None) -> str:
    """sha256 of one context's content (see the module docstring): name, genes, labels, matrix."""
    h = hashlib.sha256()
    h.update(b"celltwin-vcc2026-context\0")
    h.update(json.dumps([context, [str(g) for g in cc.genes]]).encode())
    labels = np.asarray(cc.perts).astype(str)
    h.update(json.dumps(labels.tolist()).encode())
    X = cc.X if sp.issparse(cc.X) else sp.csr_matrix(cc.X)
    X = sp.csr_matrix(X)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    keep = X.data != 0
    if not keep.all():
        row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        counts = np.bincount(row_of[keep], minlength=X.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices, data = X.indices[keep], X.data[keep]
    else:
        indptr, indices, data = X.indptr, X.indices, X.data
    h.update(str(X.shape).encode())
    _h_array(h, indptr, np.int64)
    _h_array(h, indices, np.int64)
    _h_array(h, data, np.float64)
    return h.hexdigest()


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


def config_identity(
    config: Any,
    *,
    control: str,
    targets: Any = None,
    base_seed: int = S.BASE_SEED,
    n_splits: int = S.N_SPLITS,
    baseline_seed: int = S.BASELINE_SEED,
) -> dict[str, Any]:
    """Everything besides the data that decides ``b`` and ``r``, as JSON-able values."""
    return {
        "semantics_version": SEMANTICS_VERSION,
        "config": _jsonable(config),
        "control": str(control),
        "targets": _jsonable(dict(targets)) if isinstance(targets, dict) else _jsonable(targets),
        "base_seed": int(base_seed),
        "n_splits": int(n_splits),
        "seeds": S.derive_seeds(base_seed, n_splits),
        "baseline_seed": int(baseline_seed),
    }


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# one context's scale


@dataclass
class ContextScale:
    """The scale of one context: ``b`` and ``r`` per metric, and what produced them."""

    context: str | None
    digest: str
    b: dict[str, float]
    r: dict[str, float]
    seeds: list[int]
    splits: list[dict[str, Any]] = field(default_factory=list)
    estimator: dict[str, str] = field(default_factory=dict)
    n_cells: int = 0
    perturbations: list[str] = field(default_factory=list)
    baseline_per_pert: Any = None  # pandas DataFrame (the baseline's per-perturbation values)
    real_stats: Any = None  # prepared reference-side statistics, reused by every submission

    def to_json(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "digest": self.digest,
            "b": {m: float(self.b[m]) for m in S.METRICS},
            "r": {m: float(self.r[m]) for m in S.METRICS},
            "seeds": [int(s) for s in self.seeds],
            "splits": [_jsonable(row) for row in self.splits],
            "estimator": dict(self.estimator),
            "n_cells": int(self.n_cells),
            "perturbations": list(self.perturbations),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ContextScale:
        return cls(
            context=d["context"],
            digest=d["digest"],
            b={m: float(d["b"][m]) for m in S.METRICS},
            r={m: float(d["r"][m]) for m in S.METRICS},
            seeds=[int(s) for s in d["seeds"]],
            splits=list(d.get("splits", [])),
            estimator=dict(d.get("estimator", {})),
            n_cells=int(d.get("n_cells", 0)),
            perturbations=list(d.get("perturbations", [])),
        )


def build_context_scale(
    real: Any,
    *,
    context: str | None = None,
    control: str = "non-targeting",
    targets: Any = None,
    config: Any = None,
    base_seed: int = S.BASE_SEED,
    n_splits: int = S.N_SPLITS,
    order: list[str] | None = None,
    real_stats: Any = None,
    digest: str | None = None,
) -> ContextScale:
    """Compute ``b`` and ``r`` of one context (a ContextCounts of the reference).

    ``b``: the baseline (:func:`~celltwin.eval.v2026._scale.build_baseline`) scored as a
    submission; ``r``: :func:`~celltwin.eval.v2026._scale.replicate_scores`. Both must give every
    metric a usable scale (``r`` strictly better than ``b``), else :class:`~._scale.ScaleError`.
    """
    if config is None:
        config = S.default_config()
    if real_stats is None:
        real_stats = S.prepare_real(real, control=control, targets=targets, config=config)
    baseline = S.build_baseline(real, control=control, targets=targets)
    bres = S.score_context(
        real, baseline, control=control, targets=targets, config=config, real_stats=real_stats
    )
    b = {m: float(bres.agg[m]) for m in S.METRICS}
    rep = S.replicate_scores(
        real,
        control=control,
        targets=targets,
        config=config,
        seeds=n_splits,
        base_seed=base_seed,
        order=order,
        real_stats=real_stats,
    )
    where = "" if context is None else f"context {context!r}: "
    for m in S.METRICS:
        try:
            S.scale_one(m, b[m], b[m], rep.r[m])
        except S.ScaleError as e:
            raise S.ScaleError(f"{where}{e}") from None
    labels = np.asarray(real.perts).astype(str)
    return ContextScale(
        context=context,
        digest=digest or context_digest(real, context),
        b=b,
        r=rep.r,
        seeds=rep.seeds,
        splits=rep.splits,
        estimator=rep.estimator,
        n_cells=int(labels.size),
        perturbations=sorted(set(labels.tolist()) - {control}),
        baseline_per_pert=getattr(bres, "per_pert", None),
        real_stats=real_stats,
    )


# ---------------------------------------------------------------------------------------------
# the bundle on disk


def _short(d: str) -> str:
    return d[:12]


@dataclass
class ReferenceBundle:
    """A bundle directory: its manifest and the scales of its contexts (read on demand)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ReferenceBundle | None:
        """The bundle at ``path``; ``None`` when ``path`` does not exist or is an empty directory."""
        p = Path(path)
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return None
        if not p.is_dir():
            msg = f"--bundle {p}: exists and is not a directory (a bundle is a directory)"
            raise InputError(msg)
        mf = p / MANIFEST
        try:
            manifest = json.loads(mf.read_text())
        except FileNotFoundError:
            msg = (
                f"--bundle {p}: not a celltwin vcc2026 reference bundle (no {MANIFEST}); choose another path"
            )
            raise InputError(msg) from None
        except (OSError, ValueError) as e:
            msg = f"--bundle {p}: unreadable {MANIFEST} ({type(e).__name__}: {e})"
            raise InputError(msg) from None
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            msg = f"--bundle {p}: {MANIFEST} is not a celltwin vcc2026 reference bundle manifest"
            raise InputError(msg)
        if manifest.get("version") != BUNDLE_VERSION:
            msg = (
                f"--bundle {p}: bundle format version {manifest.get('version')!r}, this celltwin reads "
                f"version {BUNDLE_VERSION}; rebuild it (another path, or delete it)"
            )
            raise BundleMismatchError(msg)
        return cls(path=p, manifest=manifest)

    def check_identity(self, identity: dict[str, Any], contexts: list[str | None]) -> None:
        """Refuse this bundle unless it was built with ``identity`` for exactly ``contexts``."""
        p = self.path
        if self.manifest.get("config_digest") != digest_of(identity):
            theirs = self.manifest.get("identity", {})
            diff = sorted(
                k
                for k in set(theirs) | set(identity)
                if json.dumps(theirs.get(k), sort_keys=True) != json.dumps(identity.get(k), sort_keys=True)
            )
            detail = "; ".join(
                f"{k}: bundle {json.dumps(theirs.get(k), sort_keys=True)[:80]}, now "
                f"{json.dumps(identity.get(k), sort_keys=True)[:80]}"
                for k in diff
            )
            msg = (
                f"--bundle {p} was built with another configuration ({detail or 'config digest differs'}); "
                "use another --bundle path or delete it"
            )
            raise BundleMismatchError(msg)
        have = [c["context"] for c in self.manifest.get("contexts", [])]
        if sorted(map(str, have)) != sorted(map(str, contexts)) or len(have) != len(contexts):
            msg = (
                f"--bundle {p} was built from other reference data: its contexts {sorted(map(str, have))} "
                f"differ from the reference's {sorted(map(str, contexts))}; use another --bundle path"
            )
            raise BundleMismatchError(msg)

    def check_context(self, context: str | None, digest: str) -> None:
        """Refuse this bundle unless its ``context`` was built from content ``digest``."""
        have = {c["context"]: c["digest"] for c in self.manifest.get("contexts", [])}
        if have.get(context) != digest:
            what = "the reference" if context is None else f"context {context!r} of the reference"
            msg = (
                f"--bundle {self.path} was built from other reference data: {what} has content digest "
                f"{_short(digest)}, the bundle's is {_short(str(have.get(context)))}; use another --bundle path"
            )
            raise BundleMismatchError(msg)

    def _dir_of(self, context: str | None) -> Path:
        for c in self.manifest.get("contexts", []):
            if c["context"] == context:
                return self.path / c["dir"]
        msg = f"--bundle {self.path}: no context {context!r}"
        raise BundleMismatchError(msg)

    def load(self, context: str | None, real: Any = None) -> ContextScale:
        """The scale of ``context``; with ``real`` (the context's ContextCounts) also its stored
        prepared statistics (``None`` when absent or unreadable: they are then recomputed)."""
        d = self._dir_of(context)
        try:
            scale = ContextScale.from_json(json.loads((d / "scale.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = f"--bundle {self.path}: unreadable {d.name}/scale.json ({type(e).__name__}: {e}); rebuild the bundle"
            raise InputError(msg) from None
        scale.real_stats = _load_stats(d, real) if real is not None else None
        return scale


class BundleWriter:
    """Writes a new bundle context by context; the directory appears, complete, on :meth:`commit`.

    Each :meth:`add` writes one context's files into a staging directory (so its prepared
    statistics can be dropped from memory), :meth:`commit` writes the manifest and moves the
    whole directory into place atomically (:func:`celltwin._io.atomic_dir`); :meth:`abort` (or an
    exception inside a ``with`` block) leaves nothing behind.
    """

    def __init__(
        self, path: str | os.PathLike[str], identity: dict[str, Any], *, extra: dict | None = None
    ) -> None:
        from celltwin import __version__
        from celltwin._io import atomic_dir

        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        self.manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "celltwin_version": __version__,
            "config_digest": digest_of(identity),
            "identity": identity,
            "contexts": self.entries,
            **(extra or {}),
        }
        self._cm = atomic_dir(self.path)
        self.stage = Path(self._cm.__enter__())
        self._open = True

    def add(self, sc: ContextScale) -> None:
        name = f"ctx-{len(self.entries):03d}"
        d = self.stage / name
        d.mkdir()
        (d / "scale.json").write_text(json.dumps(sc.to_json(), indent=1, allow_nan=False))
        t = sc.baseline_per_pert
        if t is not None and hasattr(t, "to_csv"):
            t = t.reset_index() if "perturbation" not in t.columns else t
            t.to_csv(d / "baseline_results.csv", index=False)
        _save_stats(d, sc.real_stats)
        self.entries.append({"context": sc.context, "digest": sc.digest, "dir": name})

    def commit(self) -> ReferenceBundle:
        (self.stage / MANIFEST).write_text(json.dumps(self.manifest, indent=1, allow_nan=False))
        self._open = False
        self._cm.__exit__(None, None, None)
        return ReferenceBundle(path=self.path, manifest=self.manifest)

    def abort(self) -> None:
        if self._open:
            self._open = False
            err = RuntimeError("bundle build aborted")
            try:
                self._cm.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is not None:
            self.abort()
        elif self._open:
            self.commit()


# ---------------------------------------------------------------------------------------------
# prepared statistics on disk (no pickle: arrays in an .npz, structure in JSON)


def _save_stats(d: Path, stats: Any) -> None:
    """Store the prepared reference statistics (``_metrics.RealStats``) as ``real_stats.npz``:
    arrays in the archive, the structure as JSON inside it (no pickle). The reference matrix itself
    (``RealStats.side``) is not stored: it is rebuilt from the reference on load. Anything else (or
    a structure this encoder does not know) is not stored and is recomputed per run."""
    from celltwin.eval.v2026 import _metrics as M

    if not isinstance(stats, M.RealStats):
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
    from celltwin.eval.v2026 import _metrics as M

    f = d / "real_stats.npz"
    if not f.exists():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        tree = json.loads(arrays.pop("__tree__").tobytes().decode())
        fields = {k: _decode(v, arrays) for k, v in tree.items()}
        side = M._side(real, "reference", list(fields["genes"]))
        return M.RealStats(side=side, **fields)
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
