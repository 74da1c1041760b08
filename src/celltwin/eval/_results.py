"""The outcome of one evaluation (:class:`EvalResult`) and its files.

``results.csv`` / ``agg_results.csv`` are written as polars writes them (cell-eval's files, byte for
byte), the DE tables as parquet or cell-eval's CSV (:func:`write_de_table`), the report by
:mod:`celltwin.eval._report`; :meth:`EvalResult.write` puts them all in place at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from celltwin.errors import ConfigError
from celltwin.eval._registry import PROFILE_METRICS

if TYPE_CHECKING:  # pragma: no cover
    from celltwin.eval._evaluate import EvalConfig

__all__ = ["DE_FORMATS", "OUTPUT_NAMES", "EvalResult", "write_de_table"]

#: File formats of the DE tables written by :meth:`EvalResult.write`.
DE_FORMATS = ("parquet", "csv", "none")
# every name EvalResult.write may write: an earlier run's file of these names that this run does
# not write (e.g. de_counts.png after --profile pds) is dropped, so an output directory never
# mixes two runs; any other file of the directory is kept
OUTPUT_NAMES = frozenset(
    {"results.csv", "agg_results.csv", "report.md", "report.html", "scores.png", "effects.png", "de_counts.png"}
    | {f"ranking_{m}.png" for m in PROFILE_METRICS["full"]}  # celltwin.eval._report, one per metric
    | {f"{side}_de.{fmt}" for side in ("real", "pred") for fmt in ("parquet", "csv")}
)
DEFormat = Literal["parquet", "csv", "none"]


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    ``results``: pandas DataFrame, one row per perturbation (``perturbation`` + metric columns).
    ``agg``: ``statistic`` + metric columns (count, null_count, mean, std, min, 25%, 50%, 75%, max).
    ``de_real`` / ``de_pred``: the DE tables (pandas, pdex 0.3.0 columns) or ``None`` (``pds``).
    ``bulk``: pseudobulk deltas and names used by the report (``delta_real``, ``delta_pred`` (P, G),
    ``perts``, ``genes``).
    """

    results: Any
    agg: Any
    de_real: Any
    de_pred: Any
    config: EvalConfig
    bulk: dict[str, Any] = field(default_factory=dict, repr=False)
    nulls: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def write(
        self, outdir: str | os.PathLike[str], *, report: bool = True, de_format: DEFormat = "parquet",
        prefix: str | None = None,
    ) -> list[Path]:
        """Write ``results.csv``, ``agg_results.csv``, the two DE tables and the report.

        ``de_format``: ``"parquet"`` (default) writes ``real_de.parquet`` / ``pred_de.parquet``;
        ``"csv"`` writes ``real_de.csv`` / ``pred_de.csv`` as cell-eval does (same file names,
        columns and number formatting, polars' CSV writer); ``"none"`` skips them. The tables
        are the same in every format; parquet keeps the dtypes (float32 means stay float32) and
        is about 3x smaller and 5x faster to write than CSV at 18,080 genes, which matters for
        tables of one row per (perturbation, gene). The files appear all together or not at all:
        they are written into a temporary sibling directory swapped in at the end
        (:func:`celltwin._io.atomic_dir`; other files already in ``outdir`` are kept, an earlier
        run's files of :data:`OUTPUT_NAMES` are replaced or removed). ``prefix`` (a cell type of
        :func:`~celltwin.eval._evaluate.evaluate_by_celltype`) names every file ``{prefix}_{name}`` as cell-eval does
        (``/`` in the prefix becomes ``-``). Returns the written paths.
        """
        from celltwin._io import atomic_dir

        if de_format not in DE_FORMATS:
            msg = f"EvalResult.write: de_format must be one of {', '.join(DE_FORMATS)}, got {de_format!r}"
            raise ConfigError(msg)
        final = Path(outdir)
        pre = _file_prefix(prefix)
        with atomic_dir(final, owned=frozenset(pre + n for n in OUTPUT_NAMES)) as out:
            written = self._write_files(out, report=report, de_format=de_format, prefix=prefix)
        return [final / p.relative_to(out) for p in written]

    def _write_files(self, out: Path, *, report: bool, de_format: DEFormat, prefix: str | None = None) -> list[Path]:
        written: list[Path] = []
        pre = _file_prefix(prefix)

        def _csv(df, name: str, nulls: dict[str, np.ndarray]) -> None:
            path = out / (pre + name)
            path.write_text(_to_csv(df, nulls), encoding="utf-8")
            written.append(path)

        _csv(self.results, "results.csv", self.nulls)
        _csv(self.agg, "agg_results.csv", {})
        tables = []
        if de_format != "none":
            tables = [
                (out / f"{pre}{side}_de.{de_format}", t)
                for side, t in (("real", self.de_real), ("pred", self.de_pred))
                if t is not None
            ]

        def _de(item: tuple[Path, Any]) -> Path:
            write_de_table(item[1], item[0], de_format)
            return item[0]

        # the two DE tables are written concurrently: polars formats and writes without the GIL
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(tables))) as pool:
            written.extend(pool.map(_de, tables))
        if report:
            from celltwin.eval._report import write_report

            written.extend(write_report(self, out, prefix=pre))
        return written


def _file_prefix(prefix: str | None) -> str:
    return f"{prefix.replace('/', '-')}_" if prefix else ""



def _polars_frame(table: Any):
    """A polars DataFrame of a DE table (pandas or polars) without a per-row Python object.

    Categorical columns become polars Enums built once from their categories and gathered by
    code; numeric columns are handed over as numpy arrays (zero-copy where possible).
    """
    import pandas as pd
    import polars as pl

    if isinstance(table, pl.DataFrame):
        return table
    cols = []
    for name in table.columns:
        col = table[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = [str(c) for c in col.cat.categories]
            codes = np.asarray(col.cat.codes)
            if (codes < 0).any():  # missing values: let polars build the column from strings
                cols.append(pl.Series(name, col.astype(object).to_numpy(), dtype=pl.String))
            else:
                cols.append(pl.Series(name, cats, dtype=pl.Enum(cats)).gather(codes.astype(np.uint32)))
        elif col.dtype == object:
            cols.append(pl.Series(name, col.to_numpy(), dtype=pl.String))
        else:
            cols.append(pl.Series(name, col.to_numpy()))
    return pl.DataFrame(cols)


def write_de_table(table: Any, path: str | os.PathLike[str], de_format: DEFormat = "parquet") -> None:
    """Write one DE table (pandas or polars) as parquet (lz4) or as CSV with polars.

    The CSV is what cell-eval writes (polars ``write_csv``: floats in shortest round-trip form,
    ``inf`` / ``-inf`` / ``NaN`` spelled so); the parquet file holds the same columns and dtypes.
    """
    frame = _polars_frame(table)
    if de_format == "parquet":
        frame.write_parquet(path, compression="lz4")
    elif de_format == "csv":
        frame.write_csv(path)
    else:
        msg = f"write_de_table: de_format must be 'parquet' or 'csv', got {de_format!r}"
        raise ConfigError(msg)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v if not any(c in v for c in ',"\n') else '"' + v.replace('"', '""') + '"'
    f = float(v)
    if np.isnan(f):
        return "NaN"
    if np.isinf(f):
        return "inf" if f > 0 else "-inf"
    return repr(f)


def _to_csv(df, nulls: dict[str, np.ndarray]) -> str:
    """CSV text as polars writes it: null -> empty field, NaN -> ``NaN``, floats in shortest repr."""
    cols = list(df.columns)
    data = [df[c].tolist() for c in cols]
    lines = [",".join(cols)]
    for i in range(len(df)):
        row = []
        for c, vals in zip(cols, data, strict=True):
            null = nulls.get(c)
            row.append("" if null is not None and null[i] else _fmt(vals[i]))
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
