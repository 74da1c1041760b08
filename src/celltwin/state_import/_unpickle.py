"""Read arc-state's pickled files without running code: a restricted unpickler.

arc-state saves its checkpoints and side files with ``torch.save`` / ``pickle``. A pickle can
name any importable callable and call it while loading, so reading an untrusted checkpoint with
``torch.load(weights_only=False)`` or ``pickle.load`` can run arbitrary code. Here every global
a pickle names goes through :meth:`_RestrictedUnpickler.find_class`, which admits only:

* plain containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``OrderedDict``,
  ``defaultdict``, ``int``, ``float``, ``str``, ``bytes``, ...);
* torch tensors and storages (``torch._utils._rebuild_tensor_v2`` and friends, dtypes, ``Size``);
* numpy arrays, scalars and dtypes (``numpy._core.multiarray.scalar`` / ``_reconstruct``,
  ``numpy.dtype``, ``numpy.ndarray``; numpy 1 spells them ``numpy.core...``), and
  ``_codecs.encode`` (numpy pickles a scalar's bytes as a latin-1 string);
* a fixed list of classes that only carry data but live in packages celltwin does not import
  (omegaconf's config nodes, arc-state's SE collator): these become :class:`InertObject` stand-ins
  that record their pickled state and have no behaviour.

Any other global is refused with :class:`UnsafePickleError` naming the file and the global, before
anything is called. The admitted callables only build data from data; none of them can import a
module, open a file or evaluate a string.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any

from celltwin.errors import InputError

__all__ = ["InertObject", "UnsafePickleError", "load_pickle", "load_torch", "plain"]


class UnsafePickleError(InputError):
    """A pickle names a global outside the allow-list (it could run code when loaded)."""


class InertObject:
    """A stand-in for a data-only class celltwin does not import (e.g. omegaconf's ``DictConfig``).

    ``cls_name`` is the pickled ``module.Class``; ``args`` the constructor arguments and ``state``
    whatever the pickle set on the object. It never calls anything of the original class.
    """

    cls_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.cls_name}>"


# module -> names: plain-data classes/functions that are safe to call while unpickling
_ALLOWED: dict[str, frozenset[str]] = {
    "builtins": frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                           "bytes", "bytearray", "slice", "range"}),
    "collections": frozenset({"OrderedDict", "defaultdict"}),
    "torch._utils": frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                               "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"}),
    "torch": frozenset({"Size", "device", "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                        "int8", "uint8", "bool", "complex64", "complex128"}),
    "torch.nn.parameter": frozenset({"Parameter"}),
    "torch._tensor": frozenset({"_rebuild_from_type_v2"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "numpy": frozenset({"dtype", "ndarray"}),
    "numpy.dtypes": frozenset({"Float32DType", "Float64DType", "Int64DType", "Int32DType", "BoolDType",
                               "StrDType", "UInt8DType", "Int8DType", "Int16DType", "Float16DType"}),
    "numpy._core.multiarray": frozenset({"scalar", "_reconstruct"}),
    "numpy.core.multiarray": frozenset({"scalar", "_reconstruct"}),
    "_codecs": frozenset({"encode"}),
}
# Python 2 spellings written by protocol-2 pickles
_ALIASES = {("__builtin__", "long"): ("builtins", "int"), ("__builtin__", "unicode"): ("builtins", "str")}

# data-only classes from packages celltwin does not import: replaced by inert stand-ins
_INERT = frozenset({
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode", "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "state.emb.data.loader.VCIDatasetSentenceCollator",
})
_SENTINELS = {("typing", "Any"): "typing.Any"}
_inert_classes: dict[str, type] = {}


def _inert(name: str) -> type:
    if name not in _inert_classes:
        _inert_classes[name] = type("Inert_" + name.replace(".", "_"), (InertObject,), {"cls_name": name})
    return _inert_classes[name]


class _RestrictedUnpickler(pickle.Unpickler):
    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        module, name = _ALIASES.get((module, name), (module, name))
        if module == "__builtin__":
            module = "builtins"
        if (module, name) in _SENTINELS:
            return _SENTINELS[(module, name)]
        if f"{module}.{name}" in _INERT:
            return _inert(f"{module}.{name}")
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        msg = (f"{self.source}: refusing to load: the pickle references {module}.{name}, which is not plain "
               "data (loading it could run code); celltwin reads only dicts, lists, strings, numbers, "
               "numpy arrays and torch tensors from checkpoints")
        raise UnsafePickleError(msg)


def _pickle_module(source: str) -> ModuleType:
    """A stand-in ``pickle`` module for ``torch.load(pickle_module=...)`` whose Unpickler is restricted."""
    mod = ModuleType("celltwin_restricted_pickle")
    mod.Unpickler = type("Unpickler", (_RestrictedUnpickler,), {"source": source})  # type: ignore[attr-defined]

    def load(f: Any, **kwargs: Any) -> Any:
        return mod.Unpickler(f, **kwargs).load()

    mod.load = load  # type: ignore[attr-defined]
    mod.__name__ = "pickle"  # torch checks the module's name for its own legacy-format branch
    return mod


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    return p


def plain(obj: Any) -> Any:
    """Numpy scalars -> Python scalars (``np.str_`` keys -> ``str``), recursively through dicts/lists."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {plain(k): plain(v) for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    return obj


def load_pickle(path: str | Path) -> Any:
    """A plain (non-torch) pickle file through the restricted unpickler."""
    p = _check_file(path)
    with open(p, "rb") as f:
        try:
            unpickler = _RestrictedUnpickler(f)
            unpickler.source = str(p)
            return unpickler.load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated / not a pickle
            raise InputError(f"{p}: not a readable pickle file ({type(e).__name__}: {e})") from e


def load_torch(path: str | Path) -> Any:
    """A ``torch.save`` file (zip or legacy format) through the restricted unpickler, tensors on CPU."""
    import torch

    p = _check_file(path)
    try:
        return torch.load(p, map_location="cpu", pickle_module=_pickle_module(str(p)), weights_only=False)
    except UnsafePickleError:
        raise
    except Exception as e:
        if isinstance(e.__cause__, UnsafePickleError):
            raise e.__cause__ from None
        raise InputError(f"{p}: not a readable torch file ({type(e).__name__}: {e})") from e
