"""Import an arc-state SE checkpoint (``state emb fit`` output, e.g. SE-600M) as a celltwin SE directory.

Read through the restricted unpickler (:mod:`celltwin.state_import._unpickle`; the checkpoint
pickles omegaconf configs and an arc-state collator object, which become inert stand-ins):
``state_dict``, ``hyper_parameters`` (sizes), ``cfg_yaml`` (the training config as YAML:
``dataset.pad_length``, ``dataset.cls_token_idx``, ...) and the protein-embedding table, from the
checkpoint's ``protein_embeds_dict`` or, for checkpoints without it, a ``protein_embeddings.pt``
beside it (or ``--protein-embeddings``).

Written (one atomic directory): ``model.safetensors``, ``config.json`` (``ArcSEConfig`` with
``"arch": "arc-state"``), ``genes.txt`` (the names of the gene-table rows) and ``import.json``
(source path, sha256, training step). ``celltwin embed transform``, :class:`celltwin.SEModel` and
``celltwin.StateEmbeddingModel.from_pretrained`` read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celltwin.errors import InputError
from celltwin.state_import._source import ArcSource
from celltwin.state_import._unpickle import load_torch, plain

__all__ = ["import_se_checkpoint", "load_se_checkpoint"]


def _cfg(ckpt: dict, path: Path) -> dict:
    text = ckpt.get("cfg_yaml")
    if isinstance(text, str):
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{path}: cfg_yaml is not valid YAML ({e})") from None
        return cfg if isinstance(cfg, dict) else {}
    side = path.parent / "config.yaml"
    if side.is_file():
        import yaml

        return yaml.safe_load(side.read_text()) or {}
    raise InputError(f"{path}: the checkpoint has no cfg_yaml and there is no config.yaml beside it")


def _protein_table(ckpt: dict, path: Path, protein_embeddings: str | Path | None) -> dict[str, Any]:
    if protein_embeddings is not None:
        table = load_torch(protein_embeddings)
    elif isinstance(ckpt.get("protein_embeds_dict"), dict):
        table = ckpt["protein_embeds_dict"]
    elif (path.parent / "protein_embeddings.pt").is_file():
        table = load_torch(path.parent / "protein_embeddings.pt")
    else:
        raise InputError(f"{path}: no protein_embeds_dict in the checkpoint and no protein_embeddings.pt beside it; "
                         "give --protein-embeddings")
    if not isinstance(table, dict) or not table:
        raise InputError(f"{path}: the protein-embedding table is not a non-empty {{gene: vector}} dict")
    return plain(table)


def load_se_checkpoint(path: str | Path, protein_embeddings: str | Path | None = None):
    """An :class:`~celltwin.models.arc_embedding.ArcStateEmbedding` with the checkpoint's weights (eval mode)."""
    from celltwin.models.arc_embedding import ArcSEConfig, ArcStateEmbedding

    p = Path(path)
    ckpt = load_torch(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(f"{p}: not a Lightning checkpoint (no state_dict)")
    sd = dict(ckpt["state_dict"])
    if "pe_embedding.weight" not in sd or "cls_token" not in sd:
        raise InputError(f"{p}: not an arc-state SE checkpoint (no pe_embedding.weight / cls_token in state_dict)")
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters", {})).items() if k not in ("cfg", "collater")}
    cfg = _cfg(ckpt, p)
    config = ArcSEConfig.from_arc_checkpoint(plain(hp), cfg)
    table = _protein_table(ckpt, p, protein_embeddings)
    genes = [str(g) for g in table]
    n_rows = int(sd["pe_embedding.weight"].shape[0])
    if len(genes) != n_rows:
        raise InputError(f"{p}: the protein-embedding table has {len(genes)} genes, the model's gene table "
                         f"pe_embedding has {n_rows} rows")
    model = ArcStateEmbedding(config, genes=genes)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(f"{p}: the weights do not fit the architecture read from the checkpoint "
                         f"({str(e).splitlines()[0]})") from None
    return model.eval(), {"global_step": int(ckpt.get("global_step", 0) or 0), "epoch": int(ckpt.get("epoch", 0) or 0)}


def import_se_checkpoint(src: ArcSource, out: str | Path, *,
                         protein_embeddings: str | Path | None = None) -> dict[str, Any]:
    """Write the celltwin SE directory ``out`` for an arc-state SE checkpoint; returns import.json's content."""
    from celltwin import __version__
    from celltwin._io import atomic_dir
    from celltwin.state_import.st import _sha256

    model, step = load_se_checkpoint(src.checkpoint, protein_embeddings)
    meta = {"kind": "arc-state SE checkpoint", "arch": "arc-state", "celltwin_version": __version__,
            "path": str(Path(src.checkpoint).absolute()), "sha256": _sha256(Path(src.checkpoint)), **step,
            "n_genes": len(model.genes), "config": model.config.to_dict()}
    with atomic_dir(out) as stage:
        model.save_pretrained(stage)
        (stage / "import.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta
