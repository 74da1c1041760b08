"""The controls bundle's reference files as ``vcc prep`` (vcc-cli 0.3.0) reads them, for
:func:`celltwin.eval._prep2026.prep_vcc2026`.

``gene_names.csv`` (the gene list, in order), ``pert_counts.csv`` (the perturbations each context
must hold, with their cell counts), its ``perts_fingerprint`` recorded in ``meta.json``, and the
``manifest.json`` beside them (the phase's contexts and ``panel_id``). Also the two message helpers
the 2026 prep modules share (:func:`one_line`, :func:`sample_names`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = [
    "CELLS_PER_PERT",
    "CONTEXT_COL_DEFAULT",
    "MANIFEST_NAME",
    "one_line",
    "perts_fingerprint",
    "read_gene_list",
    "read_pert_list",
    "resolve_contexts",
    "sample_names",
]

CONTEXT_COL_DEFAULT = "context"
CELLS_PER_PERT = 400  # cells per perturbation of the 2026 panel
MANIFEST_NAME = "manifest.json"  # the controls bundle's manifest: the phase's contexts, panel_id
_GENE_LIST_HEADERS = frozenset({"gene_name", "gene", "gene_symbol", "gene_names", "genes"})


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type when empty)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_names(items, k: int = 5) -> str:
    """The first ``k`` of ``items`` (as sorted strings), comma-separated, with how many more."""
    items = sorted(map(str, items))
    return ", ".join(items[:k]) + (f", ... (+{len(items) - k} more)" if len(items) > k else "")


def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """The genes of ``gene_names.csv`` in order: the first column, read as vcc reads it.

    pandas ``read_csv(header=None)``, first column as strings; a first row that is a header
    (``gene_name``, ``gene``, ``gene_symbol``, ``gene_names``, ``genes``) is dropped; duplicates
    are an error.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: gene list file not found (expected gene_names.csv: one gene symbol per row)"
        raise InputError(msg)
    try:
        col = pd.read_csv(p, header=None).iloc[:, 0]
    except Exception as e:  # noqa: BLE001 - EmptyDataError, ParserError, decoding errors
        msg = f"{p}: cannot read the gene list as CSV ({type(e).__name__}: {one_line(e)}); expected one gene per row"
        raise InputError(msg) from None
    genes = col.astype(str).tolist()
    if genes and genes[0].strip().lower() in _GENE_LIST_HEADERS:
        genes = genes[1:]
    if not genes:
        msg = f"{p}: the gene list is empty; expected one gene symbol per row"
        raise InputError(msg)
    seen: set[str] = set()
    dups = {g for g in genes if g in seen or seen.add(g)}
    if dups:
        msg = f"{p}: the gene list has {len(dups)} duplicated gene name(s) ({sample_names(dups)}); expected each gene once"
        raise InputError(msg)
    return genes


def read_pert_list(
    path: str | os.PathLike[str], default_n_cells: int | None = CELLS_PER_PERT
) -> dict[str | None, dict[str, int | None]]:
    """``{context: {perturbation: cells}}`` from ``pert_counts.csv`` (vcc's reading).

    Column ``target_gene`` (required), ``context`` (optional: one list per context; without it the
    single key ``None`` applies to every context) and ``n_cells`` (optional: a blank or unreadable
    value means no expectation for that row; without the column every perturbation expects
    ``default_n_cells``). Blank names and the ``non-targeting`` row are skipped.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: perturbation list file not found (expected pert_counts.csv from the controls bundle)"
        raise InputError(msg)
    try:
        frame = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001
        msg = f"{p}: cannot read the perturbation list as CSV ({type(e).__name__}: {one_line(e)})"
        raise InputError(msg) from None
    if PERT_COL not in frame.columns:
        msg = f"{p}: no {PERT_COL!r} column in the perturbation list; found columns {list(map(str, frame.columns))}"
        raise InputError(msg)
    has_counts = "n_cells" in frame.columns

    def rows(group) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        names = group[PERT_COL].tolist()
        counts = group["n_cells"].tolist() if has_counts else [None] * len(names)
        for value, raw in zip(names, counts, strict=True):
            if pd.isna(value):
                continue
            name = str(value).strip()
            if not name or name == CONTROL_LABEL:
                continue
            n: int | None = default_n_cells
            if has_counts:
                try:
                    n = None if pd.isna(raw) else int(float(raw))
                except (TypeError, ValueError, OverflowError):
                    n = None
            out[name] = n
        return out

    if CONTEXT_COL_DEFAULT in frame.columns:
        expected = {str(c): rows(g) for c, g in frame.groupby(frame[CONTEXT_COL_DEFAULT].astype(str))}
    else:
        expected = {None: rows(frame)}
    if not any(expected.values()):
        msg = f"{p}: the perturbation list names no perturbation (column {PERT_COL!r})"
        raise InputError(msg)
    return expected


def perts_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """``sha256:<hex>`` of the sorted unique ``target_gene`` names of ``pert_counts.csv`` (vcc's
    ``perts_fingerprint``: names stripped, blanks dropped, the control row included); ``None``
    when unreadable."""
    if not path:
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or PERT_COL not in reader.fieldnames:
                return None
            names = sorted({(row.get(PERT_COL) or "").strip() for row in reader} - {""})
    except Exception:  # noqa: BLE001 - vcc's contract: unknown, never an error
        return None
    if not names:
        return None
    return "sha256:" + hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def _read_manifest(*near) -> tuple[tuple[str, ...], str | None] | None:
    """``(contexts, panel_id)`` of the first usable ``manifest.json`` beside one of ``near``."""
    seen: set[Path] = set()
    for p in near:
        if not p:
            continue
        cand = Path(p).expanduser().resolve().parent / MANIFEST_NAME
        if cand in seen:
            continue
        seen.add(cand)
        try:
            if not cand.is_file() or cand.stat().st_size > 256 * 1024:
                continue
            data = json.loads(cand.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - an unusable manifest is "not found"
            continue
        if not isinstance(data, dict):
            continue
        ctx = data.get("contexts")
        if not isinstance(ctx, list) or not ctx or not all(isinstance(c, str) and c.strip() for c in ctx):
            continue
        panel = data.get("panel_id")
        return tuple(c.strip() for c in ctx), (panel if isinstance(panel, str) and panel else None)
    return None


def resolve_contexts(
    contexts: str | Sequence[str] | None, *, perts=None, genes=None
) -> tuple[tuple[str, ...], str | None]:
    """``(contexts, panel_id)``: ``contexts`` when given ("A,B,C"; "" disables the context checks),
    else the ``manifest.json`` of the controls bundle beside ``perts`` or ``genes``.

    ``panel_id`` (recorded in ``meta.json``) comes from that manifest, only when its contexts are
    the ones used.
    """
    for flag, p in (("--perts", perts), ("-g/--genes", genes)):
        if p is not None and isinstance(p, (str, os.PathLike)) and not Path(p).expanduser().exists():
            msg = f"{flag} {p}: file not found"
            raise InputError(msg)
    paths = [p for p in (perts, genes) if isinstance(p, (str, os.PathLike))]
    manifest = _read_manifest(*paths)
    if contexts is not None:
        if isinstance(contexts, str):
            ctx = tuple(c.strip() for c in contexts.split(",") if c.strip())
        else:
            ctx = tuple(str(c).strip() for c in contexts if str(c).strip())
        panel = manifest[1] if manifest is not None and set(manifest[0]) == set(ctx) else None
        return ctx, panel
    if manifest is not None:
        return manifest
    msg = (f"cannot tell which contexts the submission must cover: no {MANIFEST_NAME} (the controls bundle's) "
           "beside --perts or -g/--genes; give --contexts A,B,C (validation phase) or D,E,F (final phase)")
    raise ConfigError(msg)
