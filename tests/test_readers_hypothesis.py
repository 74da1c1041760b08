"""Property tests of the readers of user files: any content gives InputError / ConfigError or a valid
result, never another exception (which the CLI would report as an internal error)."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celltwin.data.source import H5adSource
from celltwin.data.split import Split, read_split
from celltwin.errors import ConfigError, InputError
from celltwin.eval._load import read_h5ad

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
    database=None,
)
_counter = itertools.count()


def _fresh(folder: Path, suffix: str) -> Path:
    """A new file name per example (HDF5 caches open files by name: never reuse one)."""
    return folder / f"case{next(_counter)}{suffix}"


# ------------------------------------------------------------------------------------ split TOML


def _toml(v) -> str:
    """TOML text of a value (quoted keys, inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


names = st.sampled_from(["ds", "d.s", "", "ds.ctx", "ctx", "val", "test", "train"]) | st.text(max_size=6)
scalars = st.one_of(
    st.sampled_from(["train", "val", "test", "data.h5ad"]),
    st.text(max_size=8),
    st.integers(),
    st.booleans(),
    st.floats(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
sections = st.sampled_from(["datasets", "training", "zeroshot", "fewshot"]) | names
documents = st.dictionaries(sections, values | st.dictionaries(names, values, max_size=4), max_size=5)


def _check_split(path: Path) -> None:
    try:
        split = read_split(path)
    except (InputError, ConfigError) as e:
        assert str(path) in str(e)  # the message names the file
        return
    assert isinstance(split, Split) and split.datasets
    split.to_toml()


@SETTINGS
@given(doc=documents)
def test_read_split_structured(tmp_path, doc):
    path = _fresh(tmp_path, ".toml")
    path.write_text(
        "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()) + "\n", encoding="utf-8"
    )
    _check_split(path)


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_read_split_any_bytes(tmp_path, data):
    path = _fresh(tmp_path, ".toml")
    path.write_bytes(data)
    _check_split(path)


@SETTINGS
@given(
    ds=st.text(min_size=1, max_size=6),
    ctx=st.text(min_size=1, max_size=6),
    val=st.lists(st.text(max_size=4), max_size=3),
    test=st.lists(st.text(max_size=4), max_size=3),
)
def test_read_split_valid_roundtrip(tmp_path, ds, ctx, val, test):
    path = _fresh(tmp_path, ".toml")
    doc = {
        "datasets": {ds: "data.h5ad"},
        "training": {ds: "train"},
        "fewshot": {f"{ds}.{ctx}": {"val": val, "test": test}},
    }
    path.write_text(
        "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()) + "\n", encoding="utf-8"
    )
    _check_split(path)


# ------------------------------------------------------------------------------------ .h5ad files


class _Raw(bytes):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<{len(self)} bytes of a 12 x 5 .h5ad>"


@pytest.fixture(scope="module")
def h5ad_bytes(tmp_path_factory, make_screen) -> bytes:
    # 4 controls + 4 A + 4 B cells x 5 genes, Poisson(1) counts, CSR float32
    a = make_screen(0, n_genes=5, perts=("A", "B"), n_per=4, contexts=("c",), categorical=True, base=1.0,
                    size_factor=None, effect=None)
    path = tmp_path_factory.mktemp("h5") / "small.h5ad"
    a.write_h5ad(path)
    return _Raw(path.read_bytes())


def _source_ok_or_input_error(path: Path) -> None:
    try:
        src = H5adSource(path)
    except (InputError, ConfigError):
        return
    try:
        assert len(src.obs) == src.n_obs and len(src.var_names) == src.n_vars
        if src.n_obs:
            src.read_rows(np.arange(min(2, src.n_obs)))
    finally:
        src.close()


@SETTINGS
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_h5ad_source_truncated(tmp_path, h5ad_bytes, frac):
    path = _fresh(tmp_path, ".h5ad")
    path.write_bytes(h5ad_bytes[: int(frac * len(h5ad_bytes))])
    _source_ok_or_input_error(path)


@SETTINGS
@given(data=st.binary(max_size=600))
def test_h5ad_source_not_hdf5(tmp_path, data):
    path = _fresh(tmp_path, ".h5ad")
    path.write_bytes(data)
    _source_ok_or_input_error(path)


corruptions = st.lists(
    st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
)


def _corrupt(raw: bytes, flips) -> bytes:
    b = bytearray(raw)
    for where, value in flips:
        b[int(where * len(b))] = value
    return bytes(b)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
    database=None,
)
@given(flips=corruptions)
def test_h5ad_source_corrupted(tmp_path, h5ad_bytes, flips):
    path = _fresh(tmp_path, ".h5ad")
    path.write_bytes(_corrupt(h5ad_bytes, flips))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _source_ok_or_input_error(path)


@SETTINGS
@given(flips=corruptions, cut=st.none() | st.floats(0.0, 1.0))
def test_eval_read_h5ad_corrupted(tmp_path, h5ad_bytes, flips, cut):
    """The evaluator's reader (celltwin.eval._load.read_h5ad): InputError or an AnnData."""
    data = _corrupt(h5ad_bytes, flips)
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = _fresh(tmp_path, ".h5ad")
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adata = read_h5ad(path)
        except InputError as e:
            assert str(path) in str(e)
            return
    assert adata.n_obs == 12
