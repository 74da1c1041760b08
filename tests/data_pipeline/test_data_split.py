"""Split TOML (cell-load / STATE format): read/write, resolution, make_split and `celltwin split`."""

from __future__ import annotations

import numpy as np
import pytest

from celltwin import cli
from celltwin.data import ObsColumns, Split, make_split, read_split, resolve_split
from celltwin.errors import ConfigError, InputError

COLS = ObsColumns(context_col="cell_type", batch_col=None)

# The publicly documented STATE example layout (keys quoted, contexts with a dataset prefix).
PUBLIC = """\
# Dataset paths - maps dataset names to their directories
[datasets]
tiny = "tiny.h5ad"

[training]
tiny = "train"

[zeroshot]
"tiny.c2" = "test"

[fewshot]
[fewshot."tiny.c1"]
val = ['A']
test = ["B", "A+B"]
"""


def test_read_public_format_and_roundtrip(tmp_path):
    p = tmp_path / "split.toml"
    p.write_text(PUBLIC)
    s = read_split(p)
    assert s.datasets == {"tiny": "tiny.h5ad"} and s.training == {"tiny": "train"}
    assert s.zeroshot == {"tiny.c2": "test"}
    assert s.fewshot == {"tiny.c1": {"val": ["A"], "test": ["B", "A+B"]}}
    assert s.dataset_path("tiny") == tmp_path / "tiny.h5ad"
    s.comment = 'odd "names" survive'
    s.fewshot["tiny.c1"]["test"].append('we"ird\\name')
    s.write(tmp_path / "out.toml")
    back = read_split(tmp_path / "out.toml")
    assert back.fewshot == s.fewshot and back.zeroshot == s.zeroshot and back.datasets == s.datasets


def test_resolve_fewshot_and_zeroshot(tmp_path, tiny):
    p = tmp_path / "split.toml"
    p.write_text(PUBLIC)
    obs = tiny.obs
    idx = resolve_split(read_split(p), obs, COLS, where="tiny.h5ad")
    pert, ctx = obs["target_gene"].to_numpy(), obs["cell_type"].to_numpy()
    ctrl = pert == "non-targeting"
    np.testing.assert_array_equal(idx.val, np.flatnonzero((ctx == "c1") & (pert == "A")))
    np.testing.assert_array_equal(
        idx.test, np.flatnonzero(((ctx == "c1") & np.isin(pert, ["B", "A+B"])) | ((ctx == "c2") & ~ctrl))
    )
    # few-shot context: controls and the remaining perturbation C are training data
    np.testing.assert_array_equal(
        idx.train, np.flatnonzero((ctx == "c1") & np.isin(pert, ["C", "non-targeting"]))
    )
    # its controls are also the val / test controls; the zero-shot context's controls are test-only
    np.testing.assert_array_equal(idx.val_controls, np.flatnonzero((ctx == "c1") & ctrl))
    np.testing.assert_array_equal(idx.test_controls, np.flatnonzero(ctrl))
    assert not set(idx.train) & set(np.flatnonzero(ctx == "c2"))
    parts = [idx.train, idx.val, idx.test]
    assert sum(x.size for x in parts) == np.unique(np.concatenate(parts)).size  # disjoint
    # alternative: zero-shot controls also in training
    idx2 = resolve_split(read_split(p), obs, COLS, zeroshot_controls_in_train=True)
    assert set(np.flatnonzero((ctx == "c2") & ctrl)) <= set(idx2.train)
    np.testing.assert_array_equal(idx2.test_controls, idx.test_controls)
    assert idx.summary() == {"train": 48, "val": 24, "test": 120, "val_controls": 24, "test_controls": 36}


def test_resolve_errors(tmp_path, tiny):
    obs = tiny.obs

    def split(**kw):
        return Split(datasets={"tiny": "t.h5ad"}, training={"tiny": "train"}, path=tmp_path / "s.toml", **kw)

    with pytest.raises(
        InputError,
        match=r"context 'c9' \(key 'tiny.c9'\) not found in tiny.h5ad column "
        r"cell_type; available: c1, c2",
    ):
        resolve_split(split(zeroshot={"tiny.c9": "test"}), obs, COLS, where="tiny.h5ad")
    with pytest.raises(
        InputError, match=r"test perturbation\(s\) with no cells in context 'c2' of tiny.h5ad: C, Q"
    ):
        resolve_split(split(fewshot={"tiny.c2": {"test": ["C", "Q", "A"]}}), obs, COLS, where="tiny.h5ad")
    no_ctrl = obs[~((obs["cell_type"] == "c2") & (obs["target_gene"] == "non-targeting"))]
    with pytest.raises(InputError, match=r"held-out context 'c2' has no control cells"):
        resolve_split(split(zeroshot={"tiny.c2": "test"}), no_ctrl, COLS)
    with pytest.raises(InputError, match=r"obs column\(s\) 'cell_line' not found"):
        resolve_split(split(), obs, ObsColumns(context_col="cell_line"), where="tiny.h5ad")
    with pytest.raises(ConfigError, match='expected "val" or "test"'):
        split(zeroshot={"tiny.c2": "train"})
    with pytest.raises(ConfigError, match="not in \\[datasets\\]"):
        split(zeroshot={"other.c2": "test"})
    with pytest.raises(ConfigError, match=r"in both val and test: A"):
        split(fewshot={"tiny.c1": {"val": ["A"], "test": ["A"]}})
    with pytest.raises(ConfigError, match="in both \\[zeroshot\\] and \\[fewshot\\]"):
        split(zeroshot={"tiny.c1": "test"}, fewshot={"tiny.c1": {"test": ["A"]}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[datasets\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_split(bad)
    bad.write_text('[datasets]\nx = "a"\n[extra]\n')
    with pytest.raises(ConfigError, match="unknown section"):
        read_split(bad)


def test_make_split_fewshot_and_zeroshot(tiny):
    obs = tiny.obs
    s = make_split(obs, COLS, target="c1", holdout=2, val=1, seed=0, dataset="tiny")
    fs = s.fewshot["tiny.c1"]
    assert len(fs["test"]) == 2 and len(fs["val"]) == 1
    assert set(fs["test"]) | set(fs["val"]) <= {"A", "B", "C", "A+B"}
    assert s == make_split(obs, COLS, target="c1", holdout=2, val=1, seed=0, dataset="tiny")  # deterministic
    draws = {
        tuple(make_split(obs, COLS, "c1", holdout=2, seed=k).fewshot["data.c1"]["test"]) for k in range(8)
    }
    assert len(draws) > 1  # the seed matters
    assert len(make_split(obs, COLS, "c1", holdout=0.5).fewshot["data.c1"]["test"]) == 2  # fraction of 4
    z = make_split(obs, COLS, target="c2", kind="zeroshot", dataset="tiny")
    assert z.zeroshot == {"tiny.c2": "test"} and not z.fewshot
    # min_cells policy: perturbations with too few cells are never held out
    small = obs[~((obs["target_gene"] == "C") & (obs.index.str[4:].astype(int) % 24 > 2))]
    s3 = make_split(small, COLS, target="c1", holdout=3, min_cells=4, seed=1)
    assert "C" not in s3.fewshot["data.c1"]["test"]
    with pytest.raises(InputError, match="3 perturbation"):
        make_split(small, COLS, target="c1", holdout=4, min_cells=4)
    with pytest.raises(
        InputError, match="target context 'c3' not found in column cell_type; available: c1, c2"
    ):
        make_split(obs, COLS, target="c3", holdout=1)
    with pytest.raises(ConfigError, match="fraction"):
        make_split(obs, COLS, target="c1", holdout=1.5)


def test_cli_split(tmp_path, tiny, capsys):
    data = tmp_path / "data" / "tiny.v1.h5ad"
    data.parent.mkdir()
    tiny.write_h5ad(data)
    out = tmp_path / "splits" / "s.toml"
    rc = cli.main(
        [
            "split",
            str(data),
            "--context-col",
            "cell_type",
            "--target",
            "c1",
            "--holdout",
            "2",
            "--seed",
            "3",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    s = read_split(out)
    assert s.datasets == {"tiny_v1": "../data/tiny.v1.h5ad"} and s.dataset_path("tiny_v1").resolve() == data
    assert len(s.fewshot["tiny_v1.c1"]["test"]) == 2
    assert "wrote" in capsys.readouterr().out
    rc = cli.main(
        [
            "split",
            str(data),
            "--context-col",
            "cell_type",
            "--target",
            "c2",
            "--kind",
            "zeroshot",
            "-o",
            str(out),
        ]
    )
    assert rc == 0 and read_split(out).zeroshot == {"tiny_v1.c2": "test"}
    rc = cli.main(
        ["split", str(data), "--context-col", "line", "--target", "c1", "--holdout", "1", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "'line' not found" in err and "cell_type" in err
    rc = cli.main(["split", str(data), "--context-col", "cell_type", "--target", "c1", "-o", str(out)])
    assert rc == 2 and "--holdout is required" in capsys.readouterr().err
