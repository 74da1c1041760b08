"""`--control-pert` is the control label's spelling on every command; the old spellings still parse."""

from __future__ import annotations

import pytest

from celltwin.cli import build_parser

# command, required arguments, old spellings of the control label, dest
CASES = [
    ("eval", ["--pred", "p.h5ad", "--real", "r.h5ad", "-o", "o"], ["--control"], "control"),
    ("prep", ["-i", "p.h5ad", "-g", "genes.csv"], ["-n", "--ntc-name"], "ntc_name"),
    ("split", ["data.h5ad", "-o", "s.toml"], ["--control-label"], "control_label"),
    ("train", ["--model", "linear", "--split", "s.toml", "-o", "run"], ["--control-label"], "control_label"),
    ("predict", ["run", "-o", "pred.h5ad"], ["--control-label"], "control_label"),
    ("baseline", ["-a", "train.h5ad"], [], "control_pert"),
]


@pytest.mark.parametrize(("cmd", "required", "old", "dest"), CASES, ids=[c[0] for c in CASES])
def test_control_pert_and_old_spellings(cmd, required, old, dest):
    parser = build_parser()
    values = {
        flag: getattr(parser.parse_args([cmd, *required, flag, "ctl"]), dest)
        for flag in ["--control-pert", *old]
    }
    assert values == dict.fromkeys(values, "ctl")
    help_text = _help(parser, cmd)
    assert "--control-pert" in help_text and all(flag in help_text for flag in old)


def _help(parser, cmd: str) -> str:
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[cmd].format_help()
