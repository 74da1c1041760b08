"""Split TOML [columns] table, explicit test lists (`celltwin split --test`) and the context default."""

from __future__ import annotations

import pytest

from celltwin import cli
from celltwin.data import ObsColumns, Split, make_split, read_split
from celltwin.data.columns import merge_columns
from celltwin.errors import ConfigError, InputError

OLD = """\
[datasets]
tiny = "tiny.h5ad"

[training]
tiny = "train"

[zeroshot]

[fewshot]
[fewshot."tiny.c1"]
val = []
test = ["B"]
"""


def _renamed(tiny):
    """The tiny screen with a user's own names: gene (perturbation), day (context), control label 'control'."""
    a = tiny.copy()
    a.obs = a.obs.rename(columns={"target_gene": "gene", "cell_type": "day"})
    a.obs["gene"] = a.obs["gene"].replace({"non-targeting": "control"})
    return a


def test_columns_table_round_trip(tmp_path):
    s = Split(datasets={"d": "d.h5ad"}, training={"d": "train"}, fewshot={"d.c1": {"val": [], "test": ["A"]}},
              columns={"context_col": "day", "pert_col": "gene", "control_label": "ctrl \"x\""})
    text = s.to_toml()
    assert '[columns]' in text and 'pert_col = "gene"' in text and 'context_col = "day"' in text
    s.write(tmp_path / "s.toml")
    back = read_split(tmp_path / "s.toml")
    # stored in field order, the escaped label survives
    assert back.columns == {"pert_col": "gene", "control_label": 'ctrl "x"', "context_col": "day"}
    assert list(back.columns) == ["pert_col", "control_label", "context_col"]
    assert back.obs_columns() == ObsColumns("gene", 'ctrl "x"', "day", "batch")
    assert back.fewshot == s.fewshot and back.datasets == s.datasets


def test_old_toml_without_columns_keeps_defaults(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text(OLD)
    s = read_split(p)
    assert s.columns == {} and s.obs_columns() is None
    assert "[columns]" not in s.to_toml()  # an old split is written back without the table
    assert merge_columns(None, s.columns) is None  # -> the callers' defaults (target_gene, ...)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('[columns]\npert = "gene"\n', "unknown key"),
        ('[columns]\npert_col = 3\n', "must be strings"),
        ('[columns]\npert_col = ""\n', "non-empty"),
        ('columns = "gene"\n', "must be a table"),
    ],
)
def test_bad_columns_table(tmp_path, table, match):
    p = tmp_path / "s.toml"
    # a top-level key must come before the first table
    p.write_text(table + OLD if table.startswith("columns") else OLD + "\n" + table)
    with pytest.raises(ConfigError, match=match):
        read_split(p)


def test_merge_columns_priority():
    # flags > split table > run > defaults, field by field; an ObsColumns layer is complete
    flags = {"pert_col": "guide_target"}
    table = {"pert_col": "gene", "control_label": "control", "context_col": "day"}
    run = {"pert_col": "x", "control_label": "y", "context_col": None, "batch_col": "lane"}
    assert merge_columns(flags, table, run) == ObsColumns("guide_target", "control", "day", "lane")
    assert merge_columns(None, table) == ObsColumns("gene", "control", "day", "batch")
    assert merge_columns(ObsColumns(), table) == ObsColumns()
    assert merge_columns(None, {}, None) is None
    with pytest.raises(ConfigError, match="unknown field"):
        merge_columns({"perturbation": "x"})


def test_make_split_records_columns_and_takes_a_test_list(tiny):
    a = _renamed(tiny)
    cols = ObsColumns("gene", "control", "day", None)
    sp = make_split(a.obs, cols, "c1", test=["C", "A", "C"], val=1, seed=0, dataset="t")
    assert sp.columns == {"pert_col": "gene", "control_label": "control", "context_col": "day"}
    assert sp.fewshot["t.c1"]["test"] == ["A", "C"]
    assert len(sp.fewshot["t.c1"]["val"]) == 1 and sp.fewshot["t.c1"]["val"][0] in {"B", "A+B"}
    with pytest.raises(InputError, match=r"no cells in context 'c1' \(column gene\): Zed, control"):
        make_split(a.obs, cols, "c1", test=["A", "Zed", "control"])
    with pytest.raises(ConfigError, match="few-shot"):
        make_split(a.obs, cols, "c1", kind="zeroshot", test=["A"])
    with pytest.raises(InputError, match="cannot hold out 4 val"):
        make_split(a.obs, cols, "c1", test=["A"], val=4)


def test_cli_split_records_columns_and_test_list(tmp_path, tiny, capsys):
    data = tmp_path / "screen.h5ad"
    _renamed(tiny).write_h5ad(data)
    out = tmp_path / "s.toml"
    base = ["split", str(data), "--pert-col", "gene", "--control-pert", "control", "--context-col", "day",
            "--batch-col", "batch", "--target", "c1", "-o", str(out)]
    assert cli.main([*base, "--test", "B, A+B"]) == 0
    printed = capsys.readouterr().out
    assert "columns: perturbation gene (control 'control'), context day, batch batch" in printed
    s = read_split(out)
    assert s.columns == {"pert_col": "gene", "control_label": "control", "context_col": "day", "batch_col": "batch"}
    assert s.fewshot["screen.c1"] == {"val": [], "test": ["A+B", "B"]}
    # @file: one per line, blank and # lines skipped; the --control-label spelling still works
    lst = tmp_path / "test.txt"
    lst.write_text("# held out\nC\n\nA\n")
    args = [a if a != "--control-pert" else "--control-label" for a in base]
    assert cli.main([*args, "--test", f"@{lst}", "--val", "1"]) == 0
    s = read_split(out)
    assert s.fewshot["screen.c1"]["test"] == ["A", "C"] and len(s.fewshot["screen.c1"]["val"]) == 1
    capsys.readouterr()
    # unknown perturbations: one line naming them
    assert cli.main([*base, "--test", "A,NOPE,ALSO_NOT"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOPE, ALSO_NOT" in err and "'c1'" in err
    with pytest.raises(SystemExit) as exc:  # an argparse usage error
        cli.main([*base, "--test", "A", "--holdout", "1"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert cli.main([*base, "--test", f"@{tmp_path / 'missing.txt'}"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_split_context_default(tmp_path, tiny, capsys):
    """--context-col defaults to 'context' (as train / predict / score); absent, the file is one context 'all'."""
    one = tiny[tiny.obs["cell_type"] == "c1"].copy()
    one.obs = one.obs.drop(columns=["cell_type"])
    data = tmp_path / "one.h5ad"
    one.write_h5ad(data)
    out = tmp_path / "s.toml"
    assert cli.main(["split", str(data), "--holdout", "1", "-o", str(out)]) == 0  # no --target needed
    assert "no context column (one context, 'all')" in capsys.readouterr().out
    s = read_split(out)
    assert list(s.fewshot) == ["one.all"] and "context_col" not in s.columns
    many = tiny.copy()
    many.obs = many.obs.rename(columns={"cell_type": "context"})
    many.write_h5ad(tmp_path / "many.h5ad")
    assert cli.main(["split", str(tmp_path / "many.h5ad"), "--holdout", "1", "-o", str(out)]) == 2
    assert "2 contexts in column context; name one (c1, c2)" in capsys.readouterr().err
    assert cli.main(["split", str(tmp_path / "many.h5ad"), "--target", "c2", "--holdout", "1", "-o", str(out)]) == 0
    assert read_split(out).columns["context_col"] == "context"
