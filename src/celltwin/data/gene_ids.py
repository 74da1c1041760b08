"""Mapping gene symbols / Ensembl IDs to current HGNC symbols (or Ensembl IDs), with a report.

The table is HGNC's export (tab-separated, one row per gene) with at least the columns
``Approved symbol``, ``Ensembl gene ID``, ``Alias symbol`` and ``Previous symbol`` (the last two
``|``-separated); ``../shared/data/annotation/hgnc_genes.tsv`` is one. Its path is a parameter.

Rules, applied to each input name in this order (first hit wins):

1. ``ENSG...`` (a version suffix ``.N`` is dropped): the gene(s) with that Ensembl ID;
2. an approved symbol, exact (case-sensitive);
3. an approved symbol, case-insensitive;
4. a previous symbol (case-insensitive) of exactly one gene;
5. an alias symbol (case-insensitive) of exactly one gene.

A name matching several genes at the first rule that hits (an Ensembl ID shared by genes, a
previous symbol or alias used by several genes) is **ambiguous** and left unmapped, with the
candidates listed; a name no rule matches is **unmapped**. Approved symbols win over previous
symbols and aliases, so a current symbol is never re-mapped to another gene.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from celltwin.errors import InputError

__all__ = ["HGNC_COLUMNS", "GeneMapping", "HgncTable", "map_genes"]

HGNC_COLUMNS = {
    "symbol": "Approved symbol",
    "ensembl": "Ensembl gene ID",
    "alias": "Alias symbol",
    "previous": "Previous symbol",
}


def _split(v) -> list[str]:
    if not isinstance(v, str) or not v:
        return []
    return [p.strip() for p in v.split("|") if p.strip()]


@dataclass
class HgncTable:
    """Lookup tables built from an HGNC export."""

    symbols: list[str]
    ensembl: list[str]  # "" when none
    by_symbol: dict[str, int]
    by_symbol_ci: dict[str, list[int]]
    by_ensembl: dict[str, list[int]]
    by_previous: dict[str, list[int]]
    by_alias: dict[str, list[int]]
    path: str = "<table>"

    @classmethod
    def from_frame(cls, df: pd.DataFrame, path: str = "<table>") -> HgncTable:
        missing = [c for c in HGNC_COLUMNS.values() if c not in df.columns]
        if missing:
            msg = (
                f"{path}: gene table lacks column(s) {', '.join(map(repr, missing))}; "
                f"available: {', '.join(map(str, df.columns))}"
            )
            raise InputError(msg)
        sym = df[HGNC_COLUMNS["symbol"]].fillna("").astype(str).tolist()
        ens = df[HGNC_COLUMNS["ensembl"]].fillna("").astype(str).tolist()
        by_symbol: dict[str, int] = {}
        by_ci: dict[str, list[int]] = defaultdict(list)
        by_ens: dict[str, list[int]] = defaultdict(list)
        by_prev: dict[str, list[int]] = defaultdict(list)
        by_alias: dict[str, list[int]] = defaultdict(list)
        for i, (s, e, a, p) in enumerate(
            zip(sym, ens, df[HGNC_COLUMNS["alias"]], df[HGNC_COLUMNS["previous"]], strict=True)
        ):
            if s:
                by_symbol.setdefault(s, i)
                by_ci[s.upper()].append(i)
            if e:
                by_ens[e.split(".")[0]].append(i)
            for x in _split(p):
                by_prev[x.upper()].append(i)
            for x in _split(a):
                by_alias[x.upper()].append(i)
        return cls(sym, ens, by_symbol, dict(by_ci), dict(by_ens), dict(by_prev), dict(by_alias), path)

    @classmethod
    def from_tsv(cls, path: str | os.PathLike[str]) -> HgncTable:
        """Read an HGNC tab-separated export."""
        p = Path(path)
        if not p.exists():
            msg = f"{p}: gene table not found"
            raise InputError(msg)
        df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
        return cls.from_frame(df, str(p))

    def lookup(self, name: str) -> tuple[str, list[int]]:
        """(rule, candidate rows) of the first rule that matches ``name``; ``("unmapped", [])`` if none."""
        n = str(name).strip()
        if n.upper().startswith("ENSG"):
            hits = self.by_ensembl.get(n.split(".")[0].upper(), [])
            return ("ensembl", hits) if hits else ("unmapped", [])
        if n in self.by_symbol:
            return "approved", [self.by_symbol[n]]
        u = n.upper()
        for rule, table in (
            ("approved_ci", self.by_symbol_ci),
            ("previous", self.by_previous),
            ("alias", self.by_alias),
        ):
            hits = table.get(u)
            if hits:
                return rule, sorted(set(hits))
        return "unmapped", []


@dataclass
class GeneMapping:
    """Result of :func:`map_genes`: a per-gene table and counts.

    ``table`` columns: ``input``, ``mapped`` (target id or ``""``), ``symbol``, ``ensembl``,
    ``status`` (``mapped`` / ``unmapped`` / ``ambiguous``), ``rule`` and ``candidates``
    (``|``-joined symbols, for ambiguous names). ``duplicates`` lists target ids reached from more
    than one input name.
    """

    table: pd.DataFrame
    duplicates: dict[str, list[str]]

    @property
    def mapped(self) -> list[str]:
        return self.table.loc[self.table["status"] == "mapped", "input"].tolist()

    @property
    def unmapped(self) -> list[str]:
        return self.table.loc[self.table["status"] == "unmapped", "input"].tolist()

    @property
    def ambiguous(self) -> list[str]:
        return self.table.loc[self.table["status"] == "ambiguous", "input"].tolist()

    def counts(self) -> dict[str, int]:
        c = self.table["status"].value_counts()
        return {k: int(c.get(k, 0)) for k in ("mapped", "unmapped", "ambiguous")} | {
            "duplicates": len(self.duplicates)
        }

    def report(self, max_names: int = 10) -> str:
        """Human-readable summary: counts, then a few names of each problem class."""
        c = self.counts()
        head = (
            f"{len(self.table)} genes: {c['mapped']} mapped, {c['unmapped']} unmapped, "
            f"{c['ambiguous']} ambiguous, {c['duplicates']} targets reached from several names"
        )
        lines = [head]
        rules = self.table.loc[self.table["status"] == "mapped", "rule"].value_counts()
        if len(rules):
            lines.append("  mapped by rule: " + ", ".join(f"{k} {v}" for k, v in rules.items()))
        for label, names in (("unmapped", self.unmapped), ("ambiguous", self.ambiguous)):
            if names:
                lines.append(
                    f"  {label}: " + ", ".join(names[:max_names]) + (" ..." if len(names) > max_names else "")
                )
        if self.duplicates:
            items = list(self.duplicates.items())[:max_names]
            lines.append("  duplicates: " + "; ".join(f"{k} <- {', '.join(v)}" for k, v in items))
        return "\n".join(lines)


def map_genes(
    names: Iterable[str], table: HgncTable | str | os.PathLike[str], to: str = "symbol"
) -> GeneMapping:
    """Map gene names / Ensembl IDs to current HGNC symbols (``to="symbol"``) or Ensembl IDs.

    A mapped gene with no Ensembl ID in the table, asked ``to="ensembl"``, counts as unmapped.
    """
    if to not in ("symbol", "ensembl"):
        msg = f"map_genes: 'to' must be 'symbol' or 'ensembl', got {to!r}"
        raise InputError(msg)
    tab = table if isinstance(table, HgncTable) else HgncTable.from_tsv(table)
    recs = []
    for name in names:
        rule, hits = tab.lookup(name)
        rec = {
            "input": str(name),
            "mapped": "",
            "symbol": "",
            "ensembl": "",
            "status": "unmapped",
            "rule": rule,
            "candidates": "",
        }
        if len(hits) == 1:
            i = hits[0]
            rec["symbol"], rec["ensembl"] = tab.symbols[i], tab.ensembl[i]
            target = rec["symbol"] if to == "symbol" else rec["ensembl"]
            if target:
                rec["mapped"], rec["status"] = target, "mapped"
        elif len(hits) > 1:
            rec["status"] = "ambiguous"
            rec["candidates"] = "|".join(tab.symbols[i] for i in hits)
        recs.append(rec)
    df = pd.DataFrame.from_records(
        recs, columns=["input", "mapped", "symbol", "ensembl", "status", "rule", "candidates"]
    )
    dup: dict[str, list[str]] = {}
    m = df[df["status"] == "mapped"]
    for target, g in m.groupby("mapped", sort=True):
        if len(g) > 1:
            dup[str(target)] = g["input"].tolist()
    return GeneMapping(df, dup)
