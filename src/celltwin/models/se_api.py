"""The State Embedding model as a notebook class: :class:`SEModel` (see :mod:`celltwin.api`).

::

    se = celltwin.SEModel(adata).train(preset="tiny", steps=500)   # options: SEOptions
    se.get_latent_representation(adata)        # adata.obsm["X_state"], as `celltwin embed transform`
    se.save("se_model")                        # a model directory, as `celltwin embed fit -o se_model`
    st = celltwin.STSEModel(adata).train(se_model="se_model")

Training and embedding run the code of ``celltwin embed fit`` / ``transform``
(:func:`celltwin.models.se_runner.fit_se`, :func:`~celltwin.models.se_embed.embed_cells`), so
the same data, options and seed give the same numbers. The caller's AnnData is only written by
:meth:`SEModel.get_latent_representation` (``obsm[key]``, by design).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celltwin._constants import EMBED_KEY
from celltwin.api import _Cells, _source
from celltwin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import numpy as np

__all__ = ["SEModel"]


class SEModel:
    """The State Embedding model: cell embeddings from expression.

    Parameters
    ----------
    adata
        Training cells (counts or log-normalised values in X, or ``layer``); ``None`` after :meth:`load`.
    layer
        read this layer instead of X (training and, by default, embedding).
    dataset_key
        obs column naming datasets (one ``[DS]`` token each; ``celltwin embed fit --dataset-key``).
    """

    def __init__(self, adata: ad.AnnData | None, *, layer: str | None = None, dataset_key: str | None = None) -> None:
        self.adata = adata
        self.layer = layer
        self.dataset_key = dataset_key
        self.model_dir: Path | None = None
        self._module = None
        self._prep = None
        self._tmp: weakref.finalize | None = None
        if adata is not None:
            _Cells.of(adata, layer)  # checks the layer
            if dataset_key is not None and dataset_key not in adata.obs.columns:
                raise InputError(f"adata: obs has no column {dataset_key!r} (dataset_key)")

    def __repr__(self) -> str:
        state = f"trained, {self.model_dir}" if self.is_trained else "not trained"
        return f"SEModel({state})"

    @staticmethod
    def options_class():
        """The typed options of :meth:`train` (:class:`~celltwin.models.se_options.SEOptions`)."""
        from celltwin.models.se_options import SEOptions

        return SEOptions

    @property
    def is_trained(self) -> bool:
        return self._module is not None

    @property
    def module(self):
        """The trained torch module (:class:`~celltwin.models.state_embedding.StateEmbeddingModel`)."""
        if self._module is None:
            raise ConfigError("SEModel: not trained; call .train() or SEModel.load(dir)")
        return self._module

    def train(self, options: Any = None, /, *, seed: int = 0, model_dir: str | Path | None = None,
              log: Callable[[str], None] | None = print, **kwargs: Any) -> SEModel:
        """Fit on every cell of the AnnData; returns ``self``.

        Options: keyword arguments (``preset="tiny", steps=500``) or one
        :class:`~celltwin.models.se_options.SEOptions`, not both. ``model_dir``: where the model
        directory is written (kept; an unfinished fit there resumes); default: a temporary one that
        lives as long as the object (:meth:`save` copies it). ``log``: receives the fit's notes
        (``None``: silent).
        """
        from celltwin.models.se_runner import fit_se

        if self.adata is None:
            raise ConfigError("SEModel: loaded without training data; construct it from an AnnData to train")
        if options is not None and kwargs:
            raise ConfigError("train: give options as keyword arguments or as one options object, not both")
        cls = self.options_class()
        opts = options if isinstance(options, cls) else cls.create(options if options is not None else kwargs)
        tmp = None
        if model_dir is None:
            out = Path(tempfile.mkdtemp(prefix="celltwin-se-"))
            tmp = weakref.finalize(self, shutil.rmtree, str(out), True)
        else:
            out = Path(model_dir)
        source = _source(_Cells.of(self.adata, self.layer))
        try:
            res = fit_se(source, out, opts, seed=seed, dataset_key=self.dataset_key,
                         log=log if log is not None else (lambda _m: None))
        except BaseException:
            if tmp is not None:
                tmp()
            raise
        if self._tmp is not None:
            self._tmp()
        self._tmp = tmp
        self.model_dir, self._module, self._prep = out, res.model, res.preprocess
        return self

    def get_latent_representation(self, adata: ad.AnnData | None = None, key: str | None = EMBED_KEY, *,
                                  layer: Any = ..., dataset_key: Any = ..., batch_size: int = 256,
                                  device: str = "auto", hgnc: str | Path | None = None) -> np.ndarray:
        """SE embeddings (n, E) float32 of every cell of ``adata`` (default: the training AnnData).

        Fills ``adata.obsm[key]`` in memory (``key=None``: only returns them); the numbers are
        those ``celltwin embed transform`` writes for the same cells (same ``--dataset-key``,
        ``--hgnc``). ``layer`` / ``dataset_key``: default the model's.
        """
        from celltwin.models.se_embed import embed_cells

        model = self.module
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ConfigError("get_latent_representation: give an AnnData (the model has no training data)")
        layer = self.layer if layer is ... else layer
        dataset_key = self.dataset_key if dataset_key is ... else dataset_key
        source = _source(_Cells.of(adata, layer))
        if getattr(model, "arch", "celltwin") == "arc-state":  # an arc-state SE: `state emb transform`'s rule
            from celltwin.models.arc_se_embed import embed_source

            emb = embed_source(model, source, batch_size=batch_size, device=device, hgnc=hgnc, log=lambda _m: None,
                               where="adata")
        else:
            emb = embed_cells(model, self._prep, source, batch_size=batch_size, device=device,
                              dataset_key=dataset_key, hgnc=hgnc, log=lambda _m: None, where="adata")
        model.cpu()
        if key is not None:
            adata.obsm[key] = emb
        return emb

    def save(self, dir_path: str | Path, overwrite: bool = False) -> Path:
        """Write the model directory (what ``celltwin embed fit -o`` writes; ``embed transform`` reads it)."""
        from celltwin._io import copy_dir

        self.module  # noqa: B018 - raises when not trained
        return copy_dir(self.model_dir, dir_path, overwrite=overwrite)

    @classmethod
    def load(cls, model_dir: str | Path, *, layer: str | None = None, dataset_key: str | None = None) -> SEModel:
        """The SE model of a directory written by ``celltwin embed fit`` or :meth:`save`."""
        from celltwin.data.preprocess import Preprocessing
        from celltwin.models.state_embedding import StateEmbeddingModel

        obj = cls(None, layer=layer, dataset_key=dataset_key)
        obj._module = StateEmbeddingModel.from_pretrained(model_dir).eval()  # also arc-state SE sources
        arc = getattr(obj._module, "arch", "celltwin") == "arc-state"
        obj._prep = None if arc else Preprocessing.load(model_dir)
        obj.model_dir = Path(model_dir)
        return obj
