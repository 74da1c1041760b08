"""Bad input and faults: every user-caused failure is one line on stderr and exit 2, no input file is
ever modified, outputs appear all together or not at all (issue 10)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celltwin import cli
from celltwin._io import STALE_AFTER_S, atomic_dir, atomic_path, clean_stale
from celltwin._output_checks import check_outputs
from celltwin.errors import InputError

# ------------------------------------------------------------------------------------------ data


def _adata(make_screen, rng, perts, n_per=20, n_genes=30, scale=1.0):
    """30 controls then ``n_per`` cells of each perturbation; the k-th perturbation scales gene k's rate by 4 * scale."""
    return make_screen(rng, genes=[f"G{i:03d}" for i in range(n_genes)], perts=perts, n_per=n_per, n_ctrl=30,
                       contexts=("c0",), categorical=True, base=2.0, size_factor=None, effect=4.0 * scale,
                       targets={p: f"G{k:03d}" for k, p in enumerate(perts)})


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_screen):
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    real = _adata(make_screen, rng, ["G001", "G002"])
    pred = _adata(make_screen, rng, ["G001", "G002"], scale=0.8)
    real.write_h5ad(d / "real.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    (d / "genes.csv").write_text("".join(f"G{i:03d}\n" for i in range(30)))
    agg = "statistic,mae,discrimination_score_l1\ncount,2,2\nmean,0.5,0.7\n"
    (d / "agg.csv").write_text(agg)
    (d / "agg2.csv").write_text(agg.replace("0.5", "0.6"))
    (d / "agg_bad.csv").write_text("statistic,mae,discrimination_score_l1\nmean,abc,0.7\n")
    (d / "split_garbage.toml").write_bytes(b"\xff\xfe\x00\x80 not [toml")
    (d / "split_typed.toml").write_text("datasets = 3\n")
    (d / "notes.txt").write_text("a regular file\n")
    (d / "text.h5ad").write_text("this is not HDF5\n")
    raw = (d / "real.h5ad").read_bytes()
    (d / "trunc.h5ad").write_bytes(raw[: len(raw) // 2])
    (d / "outdir").mkdir()
    (d / "fasta.fa").write_text(">G001\nMKV\n")
    (d / "table.csv").write_text("gene,d0,d1\nG001,0.1,0.2\nG002,0.3,0.4\n")
    os.symlink(d / "real.h5ad", d / "link.h5ad")
    os.link(d / "pred.h5ad", d / "hard.h5ad")
    return d


def _hashes(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(rc, out, err, cmd, code=2):
    assert rc == code, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"celltwin {cmd}( [a-z]+)?: error: ", lines[0]), lines[0]
    assert "Traceback" not in out + err


# ------------------------------------------------------------------------- the bad-input matrix

# (id, command, argv with {d} for the data folder)
CASES = [
    # output = input, for each command
    ("prep-out-is-input", "prep", "prep -i {d}/pred.h5ad -g {d}/genes.csv -o {d}/pred.h5ad"),
    ("prep-out-is-genes", "prep", "prep -i {d}/pred.h5ad -g {d}/genes.csv -o {d}/genes.csv"),
    ("prep-out-symlink-input", "prep", "prep -i {d}/real.h5ad -g {d}/genes.csv -o {d}/link.h5ad"),
    ("baseline-out-is-input", "baseline", "baseline -a {d}/real.h5ad -o {d}/real.h5ad --skip-de"),
    ("baseline-de-is-input", "baseline", "baseline -a {d}/real.h5ad -o {d}/b.h5ad -O {d}/real.h5ad"),
    ("baseline-hardlink", "baseline", "baseline -a {d}/pred.h5ad -o {d}/hard.h5ad --skip-de"),
    ("baseline-two-outputs", "baseline", "baseline -a {d}/real.h5ad -o {d}/b.h5ad -O {d}/b.h5ad"),
    ("baseline-counts-is-output", "baseline", "baseline -a {d}/real.h5ad -c {d}/agg.csv -o {d}/agg.csv"),
    ("score-out-is-input", "score", "score -i {d}/agg.csv -I {d}/agg2.csv -o {d}/agg.csv"),
    (
        "split-out-is-input",
        "split",
        "split {d}/real.h5ad --context-col context --target c0 --holdout 1 -o {d}/real.h5ad",
    ),
    ("eval-out-is-pred", "eval", "eval --pred {d}/pred.h5ad --real {d}/real.h5ad -o {d}/pred.h5ad"),
    ("embed-transform-out-is-data", "embed", "embed transform {d}/outdir {d}/real.h5ad -o {d}/real.h5ad"),
    ("embed-fit-out-is-data", "embed", "embed fit --data {d}/real.h5ad -o {d}/real.h5ad"),
    (
        "genes-embed-out-is-fasta",
        "genes",
        "genes embed --fasta {d}/fasta.fa --model {d}/outdir -o {d}/fasta.fa",
    ),
    (
        "genes-coverage-missing-is-data",
        "genes",
        "genes coverage {d}/table.csv {d}/real.h5ad --missing {d}/real.h5ad",
    ),
    # output is a directory / a file / under a regular file
    ("sim-out-is-dir", "sim", "sim --preset tiny -o {d}/outdir"),
    ("score-out-is-dir", "score", "score -i {d}/agg.csv -I {d}/agg2.csv -o {d}/outdir"),
    ("prep-out-is-dir", "prep", "prep -i {d}/pred.h5ad -g {d}/genes.csv -o {d}/outdir"),
    ("eval-outdir-is-file", "eval", "eval --pred {d}/pred.h5ad --real {d}/real.h5ad -o {d}/notes.txt"),
    ("demo-outdir-is-file", "demo", "demo --preset tiny -o {d}/notes.txt"),
    ("embed-fit-outdir-is-file", "embed", "embed fit --data {d}/real.h5ad -o {d}/notes.txt"),
    ("sim-under-file", "sim", "sim --preset tiny -o {d}/notes.txt/x.h5ad"),
    ("score-under-file", "score", "score -i {d}/agg.csv -I {d}/agg2.csv -o {d}/notes.txt/score.csv"),
    ("eval-under-file", "eval", "eval --pred {d}/pred.h5ad --real {d}/real.h5ad -o {d}/notes.txt/out"),
    (
        "split-under-file",
        "split",
        "split {d}/real.h5ad --context-col context --target c0 --holdout 1 -o {d}/notes.txt/s.toml",
    ),
    ("baseline-under-file", "baseline", "baseline -a {d}/real.h5ad -o {d}/notes.txt/b.h5ad --skip-de"),
    # bad values and files
    (
        "split-holdout-nan",
        "split",
        "split {d}/real.h5ad --context-col context --target c0 --holdout nan -o {d}/s.toml",
    ),
    (
        "split-holdout-inf",
        "split",
        "split {d}/real.h5ad --context-col context --target c0 --holdout inf -o {d}/s.toml",
    ),
    (
        "embed-fit-split-garbage",
        "embed",
        "embed fit --data {d}/real.h5ad --split {d}/split_garbage.toml -o {d}/se",
    ),
    (
        "embed-fit-split-typed",
        "embed",
        "embed fit --data {d}/real.h5ad --split {d}/split_typed.toml -o {d}/se",
    ),
    ("embed-fit-batch-0", "embed", "embed fit --data {d}/real.h5ad -o {d}/se --batch-size 0"),
    (
        "embed-transform-batch-0",
        "embed",
        "embed transform {d}/outdir {d}/real.h5ad -o {d}/e.h5ad --batch-size 0",
    ),
    ("score-non-numeric", "score", "score -i {d}/agg_bad.csv -I {d}/agg.csv -o {d}/score.csv"),
    ("score-garbage-csv", "score", "score -i {d}/split_garbage.toml -I {d}/agg.csv -o {d}/score.csv"),
    (
        "baseline-counts-garbage",
        "baseline",
        "baseline -a {d}/real.h5ad -c {d}/split_garbage.toml -o {d}/b.h5ad",
    ),
    ("prep-genes-garbage", "prep", "prep -i {d}/pred.h5ad -g {d}/split_garbage.toml -o {d}/p.vcc"),
]
for name in ("trunc", "text"):
    CASES += [
        (
            f"split-{name}-h5ad",
            "split",
            f"split {{d}}/{name}.h5ad --context-col context --target c0 -o {{d}}/s.toml",
        ),
        (
            f"eval-{name}-h5ad",
            "eval",
            f"eval --pred {{d}}/{name}.h5ad --real {{d}}/real.h5ad -o {{d}}/ev --no-progress",
        ),
        (f"prep-{name}-h5ad", "prep", f"prep -i {{d}}/{name}.h5ad -g {{d}}/genes.csv -o {{d}}/p.vcc"),
        (f"baseline-{name}-h5ad", "baseline", f"baseline -a {{d}}/{name}.h5ad -o {{d}}/b.h5ad --skip-de"),
        (f"genes-coverage-{name}-h5ad", "genes", f"genes coverage {{d}}/table.csv {{d}}/{name}.h5ad"),
    ]


@pytest.mark.parametrize(("cmd", "argv"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_inputs_unchanged(files, capsys, cmd, argv):
    before = _hashes(files)
    rc, out, err = _run(capsys, argv.format(d=files).split())
    _assert_one_line(rc, out, err, cmd)
    assert _hashes(files) == before  # no input (or any other file) was modified
    leftovers = [p.name for p in files.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_eval_profile_full_with_two_perturbations(files, capsys, tmp_path):
    """clustering_agreement needs >= 3 perturbations: it is left out with a warning, not a crash."""
    out = tmp_path / "full"
    with pytest.warns(UserWarning, match="clustering_agreement skipped"):
        rc, _, err = _run(
            capsys,
            [
                "eval",
                "--pred",
                str(files / "pred.h5ad"),
                "--real",
                str(files / "real.h5ad"),
                "-o",
                str(out),
                "--profile",
                "full",
                "--no-progress",
                "--no-cache",
                "--no-report",
            ],
        )
    assert rc == 0, err
    cols = pd.read_csv(out / "agg_results.csv").columns
    assert "clustering_agreement" not in cols and "pearson_edistance" in cols


# ------------------------------------------------------------------------- file-size limit / full disk


def _limit_fsize(n: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write gets EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return pre


# slow: two `celltwin eval` processes (~8 s); the quick loop keeps the error mapping
# (test_cli_maps_wrapped_disk_full_and_path_errors) and the atomic swap (test_atomic_dir_swaps_all_together)
@pytest.mark.slow
def test_eval_under_file_size_limit_keeps_previous_outputs(files, tmp_path):
    out = tmp_path / "ev"
    base = [
        sys.executable,
        "-m",
        "celltwin",
        "eval",
        "--pred",
        str(files / "pred.h5ad"),
        "--real",
        str(files / "real.h5ad"),
        "-o",
        str(out),
        "--no-cache",
        "--no-progress",
        "--no-report",
    ]
    first = subprocess.run(base, check=False, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (out / "mine.txt").write_text("a file of the user's")
    before = _hashes(files)
    previous = _hashes(out)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run(
        base + ["--de-format", "csv"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_fsize(300),
        env=env,
    )
    _assert_one_line(r.returncode, r.stdout, r.stderr, "eval")
    assert "disk full / file size limit while writing" in r.stderr
    assert _hashes(files) == before
    assert _hashes(out) == previous  # the previous run's outputs, untouched and complete
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # staging removed


def test_cli_maps_wrapped_disk_full_and_path_errors(monkeypatch, capsys):
    def fake(raise_):
        mod = types.ModuleType("celltwin.commands._fake")
        mod.HELP = "fake"
        mod.add_arguments = lambda p: p.add_argument("-o", "--output", default="out.h5ad")
        mod.run = lambda args: raise_()
        monkeypatch.setitem(sys.modules, "celltwin.commands._fake", mod)
        monkeypatch.setitem(cli.COMMANDS, "fake", "_fake")

    def h5py_like():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            tmp = "/x/.out.h5ad.123-abcdefgh.tmp.h5ad"
            msg = f"Can't write data (file write failed: filename = '{tmp}', errno = 28)"
            raise RuntimeError(msg) from e

    fake(h5py_like)
    rc, out, err = _run(capsys, ["fake"])
    _assert_one_line(rc, out, err, "fake")
    assert err.strip() == "celltwin fake: error: disk full / file size limit while writing /x/out.h5ad"

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/root/secret.h5ad")

    fake(denied)
    rc, out, err = _run(capsys, ["fake"])
    _assert_one_line(rc, out, err, "fake")
    assert "/root/secret.h5ad: Permission denied" in err


def test_cli_internal_error_saves_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mod = types.ModuleType("celltwin.commands._fake")
    mod.HELP = "fake"
    mod.add_arguments = lambda p: None

    def run(args):
        return {}["missing"]

    mod.run = run
    monkeypatch.setitem(sys.modules, "celltwin.commands._fake", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", "_fake")
    rc, _, err = _run(capsys, ["fake"])
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("celltwin fake: internal error: KeyError: 'missing'")
    assert "--debug" in lines[0] and "Traceback" not in err
    (crash,) = (tmp_path / "celltwin").glob("crash-*.txt")
    assert str(crash) in lines[0] and "Traceback" in crash.read_text()
    for argv in (["--debug", "fake"], ["fake", "--debug"]):
        rc, _, err = _run(capsys, argv)
        assert rc == 1 and "Traceback" in err and "KeyError" in err


def test_usage_errors_are_one_line_and_global_flags(files, capsys, tmp_path):
    rc, out, err = _run(capsys, ["score", "--no-such-flag"])
    _assert_one_line(rc, out, err, "score")
    for flags in (["-q"], ["--verbose"], ["--debug"]):
        argv = [
            "score",
            "-i",
            str(files / "agg.csv"),
            "-I",
            str(files / "agg2.csv"),
            "-o",
            str(tmp_path / "s.csv"),
        ]
        rc, out, err = _run(capsys, flags + argv)
        assert rc == 0 and "avg_score" in out, err
        rc, out, err = _run(capsys, argv + flags)
        assert rc == 0, err


# ------------------------------------------------------------------------- _io helpers


def test_check_outputs_same_file_by_link(tmp_path):
    src = tmp_path / "in.h5ad"
    src.write_text("x")
    os.link(src, tmp_path / "hard.h5ad")
    os.symlink(src, tmp_path / "soft.h5ad")
    for other in ("hard.h5ad", "soft.h5ad", "./in.h5ad"):
        with pytest.raises(InputError, match="-o/--output .* same file as -i/--input"):
            check_outputs({"-o/--output": tmp_path / other}, {"-i/--input": src})
    check_outputs({"-o/--output": tmp_path / "new.h5ad"}, {"-i/--input": src, "--x": None})
    with pytest.raises(InputError, match="inside the output directory"):
        check_outputs({"-o": tmp_path / "d", "-O": tmp_path / "d" / "x.csv"}, dirs={"-o"})


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_dir_swaps_all_together(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, owned={"a.csv", "b.csv", "c.png"}) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.name.endswith(".tmpdir")
        (tmp / "a.csv").write_text("1")
        (tmp / "c.png").write_text("1")
    assert _names(out) == ["a.csv", "c.png"]
    (out / "user.txt").write_text("keep me")
    # a failing run leaves the previous outputs untouched and no staging folder
    with pytest.raises(RuntimeError), atomic_dir(out, owned={"a.csv", "b.csv", "c.png"}) as tmp:
        (tmp / "a.csv").write_text("2")
        raise RuntimeError("killed")
    assert (out / "a.csv").read_text() == "1" and _names(tmp_path) == ["out"]
    # a new run: owned files it does not write (c.png) go, the user's file stays
    inode = (out / "user.txt").stat().st_ino
    with atomic_dir(out, owned={"a.csv", "b.csv", "c.png"}) as tmp:
        (tmp / "a.csv").write_text("3")
        (tmp / "b.csv").write_text("3")
    assert _names(out) == ["a.csv", "b.csv", "user.txt"]
    assert (out / "a.csv").read_text() == "3" and (out / "user.txt").stat().st_ino == inode
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_in_place_for_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.csv").write_text("old")
    (tmp_path / "mine.txt").write_text("mine")
    with atomic_dir(".", owned={"old.csv", "new.csv"}) as tmp:
        assert tmp.parent == tmp_path
        (tmp / "new.csv").write_text("new")
    assert _names(tmp_path) == ["mine.txt", "new.csv"]


def test_stale_leftovers_are_cleaned_but_live_ones_kept(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    old = time.time() - STALE_AFTER_S - 60
    stale_file = tmp_path / f".out.csv.{dead_pid}-abcdefgh.tmp.csv"
    stale_dir = tmp_path / f".out.csv.{dead_pid}-ijklmnop.tmpdir"
    live = tmp_path / f".out.csv.{os.getpid()}-qrstuvwx.tmp.csv"
    young = tmp_path / f".out.csv.{dead_pid}-yzabcdef.tmp.csv"
    other = tmp_path / f".other.csv.{dead_pid}-abcdefgh.tmp.csv"
    stale_file.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "f").write_text("x")
    for p in (stale_file, stale_dir / "f", stale_dir, live, other):
        if not p.exists():
            p.write_text("x")
        os.utime(p, (old, old))
    young.write_text("x")
    with atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.csv", live.name, young.name, other.name]
    )
    # after 24 hours anything of out.csv goes, whatever its pid
    assert sorted(clean_stale(tmp_path, "out.csv", now=time.time() + 2 * 86400)) == sorted(
        [live.name, young.name]
    )
