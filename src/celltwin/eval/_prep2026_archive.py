"""The 2026 upload archive as ``vcc prep`` (vcc-cli 0.3.0) writes it: ``meta.json`` and ``pred.h5ad.zst``.

Written by :func:`celltwin.eval._prep2026.prep_vcc2026` once every check passed:

* an uncompressed tar (Python's tarfile, PAX format, its default: an extended header only where
  ustar cannot hold a field, e.g. a member over 8 GiB) with two members, in this order:
  ``meta.json`` then ``pred.h5ad.zst``; both with uid/gid 0, empty user/group names, mtime 0 and
  mode 0644, padded to tarfile's 10240-byte records;
* ``meta.json``: ``json.dumps(meta, sort_keys=True)`` (default separators, no trailing newline)
  of ``{"schema": 1, "nnz": <stored entries of X>, "n_obs", "n_vars", "cli_version",
  "contexts": [...], "perts_fingerprint": "sha256:...", "panel_id": ...}``; the last two only when
  known (``--perts`` given; a ``manifest.json`` with the same contexts beside it). ``cli_version``
  is the one field that names its writer: vcc writes its own version (``0.3.0``), celltwin writes
  ``0.3.0+celltwin.<celltwin version>`` (the format version, with a local label saying who wrote
  it); :func:`~celltwin.eval._prep2026.prep_vcc2026` takes ``cli_version="0.3.0"`` to reproduce
  vcc's bytes exactly;
* ``pred.h5ad.zst``: one zstd frame (level 3, multi-threaded mode, whose output does not depend on
  the thread count; no content size, no checksum) of the h5ad that ``anndata.write_h5ad`` writes
  for ``AnnData(X, obs, var)``: X the prediction's raw counts, canonical (sorted, duplicates
  summed; explicit zeros of a sparse input kept, zeros of a dense input dropped), columns in the
  gene list's order, cast to float32 (``encoding=64``: float64), CSR (a CSC input stays CSC);
  obs index ``"0".."n-1"``, columns ``target_gene`` (``output_pert_col``), ``celltype`` (only with
  ``celltype_col``) and the context column; var: the gene names only.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

from celltwin._io import atomic_path
from celltwin.eval._prep2026_refs import perts_fingerprint

__all__ = [
    "META_MEMBER",
    "META_SCHEMA",
    "PRED_MEMBER",
    "VCC_CLI_VERSION",
    "archive_meta",
    "celltwin_cli_version",
    "write_archive",
]

VCC_CLI_VERSION = "0.3.0"  # the vcc-cli release whose archive this module writes
META_MEMBER = "meta.json"
PRED_MEMBER = "pred.h5ad.zst"
META_SCHEMA = 1
_ZSTD_MAX_THREADS = 8


def celltwin_cli_version() -> str:
    """``meta.json``'s ``cli_version`` as celltwin writes it: ``0.3.0+celltwin.<version>``.

    A PEP 440 local version: anything parsing it reads the vcc-cli format release (0.3.0), and the
    local label says which program wrote the file.
    """
    from celltwin import __version__

    local = ".".join(p for p in re.split(r"[^A-Za-z0-9]+", str(__version__)) if p)
    return f"{VCC_CLI_VERSION}+celltwin.{local or 'unknown'}"


def archive_meta(*, nnz: int, n_obs: int, n_vars: int, contexts: Sequence[str],
                 perts: str | os.PathLike[str] | None, panel_id: str | None,
                 cli_version: str | None = None) -> dict:
    """``meta.json``'s content; ``perts_fingerprint`` and ``panel_id`` only when known.

    ``cli_version``: the writer field (default :func:`celltwin_cli_version`).
    """
    meta = {"schema": META_SCHEMA, "nnz": nnz, "n_obs": int(n_obs), "n_vars": n_vars,
            "cli_version": cli_version or celltwin_cli_version(), "contexts": list(contexts),
            "perts_fingerprint": perts_fingerprint(perts) if perts else None, "panel_id": panel_id}
    return {k: v for k, v in meta.items() if v is not None}


def _zstd_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _ZSTD_MAX_THREADS))


def _tar_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """vcc's member header: uid/gid 0, empty user/group names, mtime 0, mode 0644."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info


def write_archive(out: Path, tmp: Path, X, obs, var, meta: dict) -> None:
    """Write ``out`` (atomically): the h5ad of ``AnnData(X, obs, var)`` compressed, and ``meta``; ``tmp``: a
    scratch folder beside ``out``."""
    import anndata as ad
    import zstandard

    h5 = tmp / "pred.h5ad"
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(h5)
    del X
    zst = tmp / PRED_MEMBER
    cctx = zstandard.ZstdCompressor(level=3, threads=_zstd_threads())
    with open(h5, "rb") as fin, open(zst, "wb") as fout:
        cctx.copy_stream(fin, fout)
    h5.unlink()
    meta_path = tmp / META_MEMBER
    meta_path.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
    with atomic_path(out, suffix=".vcc") as tmp_out, \
            tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(meta_path, arcname=META_MEMBER, filter=_tar_member)
        tar.add(zst, arcname=PRED_MEMBER, filter=_tar_member)
