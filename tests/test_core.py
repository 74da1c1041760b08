"""Tests of the shared core: atomic writes, the CLI error contract, torch-free imports."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from celltwin import cli
from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temp file left behind

    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_path_creates_parent(tmp_path):
    target = tmp_path / "a" / "b" / "x.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("1")
    assert target.read_text() == "1"


def test_atomic_path_gives_plain_file_permissions(tmp_path):
    """A new file gets what open() gives it (0o666 minus the umask), not mkstemp's private 0o600;
    a replaced file keeps its mode."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    new = tmp_path / "new.txt"
    with atomic_path(new) as tmp:
        tmp.write_text("x")
    assert new.stat().st_mode & 0o7777 == plain.stat().st_mode & 0o7777
    old = tmp_path / "old.txt"
    old.write_text("x")
    old.chmod(0o640)
    with atomic_path(old) as tmp:
        tmp.write_text("y")
    assert old.stat().st_mode & 0o7777 == 0o640 and old.read_text() == "y"


@pytest.mark.parametrize("exc", [InputError, ConfigError])
def test_cli_turns_celltwin_errors_into_exit_2(monkeypatch, capsys, exc):
    mod = types.ModuleType("celltwin.commands._fake")
    mod.HELP = "fake"

    def add_arguments(p):
        p.add_argument("--x", default="1")

    def run(args):
        msg = f"file 'a.h5ad': obs['target_gene'] expected 'non-targeting', got {args.x!r}"
        raise exc(msg)

    mod.add_arguments, mod.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "celltwin.commands._fake", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", "_fake")
    assert cli.main(["fake", "--x", "zz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["celltwin fake: error: file 'a.h5ad': obs['target_gene'] expected 'non-targeting', got 'zz'"]


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: celltwin" in capsys.readouterr().out


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_import_celltwin_does_not_import_torch():
    mods = _modules_after("import celltwin, celltwin.cli")
    assert "celltwin" in mods
    assert "torch" not in mods


def test_help_of_every_command_does_not_import_torch():
    code = (
        "import contextlib, io\n"
        "from celltwin import cli\n"
        "p = cli.build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    p.parse_args(['eval', '--help'])\n"
    )
    mods = _modules_after(code)
    assert "celltwin.cli" in mods
    assert "torch" not in mods
