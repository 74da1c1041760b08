"""The reference bundle: a context's scale ends ``b`` and ``r``, computed once and reused.

Building the scale of a context costs one baseline scoring run, five split-half scoring runs and
fifteen extra DE passes (:mod:`celltwin.eval.v2026._context_scale`); all of it reads the reference alone,
so it is the same for every submission. A bundle stores it on disk, in a directory the user
names (``celltwin eval --profile vcc2026 --bundle PATH``)::

    PATH/manifest.json               format, identity of the reference and of the configuration
    PATH/ctx-000/scale.json          b, r, the five per-split values, seeds, cohort sizes
    PATH/ctx-000/baseline_results.csv  the baseline's per-perturbation values (for inspection)
    PATH/ctx-000/real_stats.npz      the prepared reference-side statistics (profiles, jackknife
                                     corrections, the reference DE table; no pickle:
                                     :mod:`._bundle_codec`), so a reused bundle scores a
                                     submission without re-running the reference DE

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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026._baseline import BASELINE_SEED
from celltwin.eval.v2026._bundle_codec import _jsonable, _load_stats, _save_stats
from celltwin.eval.v2026._replicate import BASE_SEED, N_SPLITS, derive_seeds
from celltwin.eval.v2026._scale import METRICS

__all__ = [
    "BUNDLE_FORMAT",
    "SEMANTICS_VERSION",
    "BundleMismatchError",
    "BundleWriter",
    "ContextScale",
    "ReferenceBundle",
    "config_identity",
    "context_digest",
    "digest_of",
]

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


def config_identity(
    config: Any,
    *,
    control: str,
    targets: Any = None,
    base_seed: int = BASE_SEED,
    n_splits: int = N_SPLITS,
    baseline_seed: int = BASELINE_SEED,
) -> dict[str, Any]:
    """Everything besides the data that decides ``b`` and ``r``, as JSON-able values."""
    return {
        "semantics_version": SEMANTICS_VERSION,
        "config": _jsonable(config),
        "control": str(control),
        "targets": _jsonable(dict(targets)) if isinstance(targets, dict) else _jsonable(targets),
        "base_seed": int(base_seed),
        "n_splits": int(n_splits),
        "seeds": derive_seeds(base_seed, n_splits),
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
            "b": {m: float(self.b[m]) for m in METRICS},
            "r": {m: float(self.r[m]) for m in METRICS},
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
            b={m: float(d["b"][m]) for m in METRICS},
            r={m: float(d["r"][m]) for m in METRICS},
            seeds=[int(s) for s in d["seeds"]],
            splits=list(d.get("splits", [])),
            estimator=dict(d.get("estimator", {})),
            n_cells=int(d.get("n_cells", 0)),
            perturbations=list(d.get("perturbations", [])),
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

