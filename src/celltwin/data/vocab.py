"""Explicit vocabularies (perturbations, contexts, batches, genes) saved as JSON next to a run.

A :class:`Vocab` maps names to contiguous integer ids in a fixed order. Order rule: the order
given at construction; :meth:`Vocab.from_values` sorts the distinct values (Python string order),
optionally putting one name (the control label) first at id 0. Unknown names raise
:class:`~celltwin.errors.InputError` unless the vocabulary has an ``unknown`` entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

__all__ = ["Vocab", "Vocabularies"]


class Vocab:
    """Name <-> id mapping. ``vocab["A"] -> 3``, ``vocab.names[3] -> "A"``, ``len(vocab)``."""

    def __init__(self, names: Sequence[str], kind: str = "vocab", unknown: str | None = None) -> None:
        self.names: list[str] = [str(n) for n in names]
        self.kind = kind
        self.unknown = unknown
        self._pos = {n: i for i, n in enumerate(self.names)}
        if len(self._pos) != len(self.names):
            msg = f"{kind} vocabulary: names must be unique"
            raise ConfigError(msg)
        if unknown is not None and unknown not in self._pos:
            msg = f"{kind} vocabulary: unknown entry {unknown!r} is not one of the names"
            raise ConfigError(msg)

    @classmethod
    def from_values(
        cls, values: Iterable[str], kind: str = "vocab", first: str | None = None, unknown: str | None = None
    ) -> Vocab:
        """Sorted distinct values; ``first`` (when given) is put at id 0."""
        uniq = sorted({str(v) for v in values})
        if first is not None:
            uniq = [first] + [u for u in uniq if u != first]
        return cls(uniq, kind=kind, unknown=unknown)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._pos

    def __getitem__(self, name: str) -> int:
        i = self._pos.get(str(name))
        if i is None:
            if self.unknown is not None:
                return self._pos[self.unknown]
            shown = ", ".join(self.names[:10]) + (" ..." if len(self.names) > 10 else "")
            msg = (
                f"{self.kind} {name!r} is not in the run's {self.kind} vocabulary "
                f"({len(self)} entries: {shown})"
            )
            raise InputError(msg)
        return i

    def encode(self, names: Iterable[str]) -> np.ndarray:
        """Ids of ``names`` as int64."""
        return np.fromiter((self[n] for n in names), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.names[int(i)] for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.names == other.names and self.unknown == other.unknown

    def __repr__(self) -> str:
        return f"Vocab({self.kind}, n={len(self)})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "unknown": self.unknown}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["names"], kind=d.get("kind", "vocab"), unknown=d.get("unknown"))


@dataclass
class Vocabularies:
    """The four vocabularies of a run; saved to / loaded from ``vocab.json``."""

    perturbations: Vocab
    contexts: Vocab
    batches: Vocab
    genes: Vocab

    FILENAME = "vocab.json"

    @classmethod
    def from_labels(cls, labels, genes: Sequence[str]) -> Vocabularies:
        """Vocabularies of a :class:`~celltwin.data.matching.CellLabels` (pass labels of *all* rows so
        held-out perturbations and contexts get ids too). The control label is perturbation id 0;
        other names are sorted. Genes keep the given (model) order."""
        return cls(
            perturbations=Vocab.from_values(labels.pert, "perturbation", first=labels.control_label),
            contexts=Vocab.from_values(labels.context, "context"),
            batches=Vocab.from_values(labels.batch, "batch"),
            genes=Vocab(list(genes), "gene"),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON to ``path`` (a file, or a directory -> ``DIR/vocab.json``), atomically."""
        p = Path(path)
        if p.is_dir() or p.suffix == "":
            p = p / self.FILENAME
        doc = {k: getattr(self, k).to_dict() for k in ("perturbations", "contexts", "batches", "genes")}
        with atomic_path(p) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabularies:
        p = Path(path)
        if p.is_dir():
            p = p / cls.FILENAME
        if not p.exists():
            msg = f"{p}: vocabulary file not found"
            raise InputError(msg)
        doc = json.loads(p.read_text(encoding="utf-8"))
        try:
            return cls(
                **{k: Vocab.from_dict(doc[k]) for k in ("perturbations", "contexts", "batches", "genes")}
            )
        except KeyError as e:
            msg = f"{p}: missing vocabulary {e.args[0]!r}"
            raise InputError(msg) from e
