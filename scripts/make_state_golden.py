"""Regenerate the arc-state golden files under tests/data/state_golden/ (issue 12, item 5).

arc-state (Arc Institute's STATE, CC BY-NC-SA) is used here strictly as a black box: its
``state`` CLI, the files it writes and the outputs it produces. Nothing in celltwin imports it;
this script runs only inside its own throwaway virtualenv (see ``make_state_golden.sh``)::

    python3 -m venv /tmp/arc-venv
    /tmp/arc-venv/bin/pip install torch==2.13.0            # CPU wheel first
    /tmp/arc-venv/bin/pip install arc-state==0.11.1 transformers==4.57.6
    /tmp/arc-venv/bin/python scripts/make_state_golden.py [--work /tmp/state_golden_work]

What it does (all seeded):

1. Writes a tiny synthetic perturb-seq dataset with numpy/anndata only (280 cells x 64 genes,
   2 cell types, 5 perturbations + ``non-targeting``, CSR counts) and runs
   ``state tx preprocess_train`` on it (normalize_total + log1p + 32 HVGs -> ``obsm['X_hvg']``).
   A synthetic 16-d ``obsm['X_state']`` (fixed random projection) stands in for SE embeddings.
2. For each ST variant in ``ST_VARIANTS`` runs ``state tx train`` for 2 steps with tiny sizes
   (Hydra overrides), copies the run directory files arc-state writes, then runs
   ``state tx infer`` on a 57-cell input and records its output. The ``tx infer`` run is done
   through a small wrapper (``_state`` mode of this script) that records, with torch hooks,
   every call of the ST model's ``forward`` (inputs, ``padded`` flag, output) and, for the
   first call, the outputs of the main sub-modules (plus any child module the CLI calls outside
   ``forward``, i.e. the gene decoder). The model is also called directly on one padded batch of
   two sets (``forward(batch, padded=True)``). With torch >= 2.6, plain ``tx infer`` cannot load
   output_space=all checkpoints (numpy int64 scalars in ``hyper_parameters`` are refused by
   ``torch.load(weights_only=True)``); for those the failure is recorded and ``tx infer`` is rerun
   with numpy's scalar/dtype classes allow-listed (``torch.serialization.add_safe_globals``).
3. SE: builds a random 24-d "protein embedding" table for the 64 genes, runs
   ``state emb preprocess`` (profile files) and ``state emb fit`` for one epoch (35 steps) with
   tiny sizes. ``emb fit`` in 0.11.1 hard-codes ``model.cuda()`` and a NCCL DDP process group,
   so it is run through a CPU shim that turns ``.cuda()`` into a no-op and maps ``nccl`` to
   ``gloo`` (arc-state's code is not changed). Then ``state emb transform`` is run on two inputs:
   a tie-free one (deterministic; checked by running it twice) and a realistic count matrix
   (its cell-sentence sampling is random: the run is seeded in the wrapper and the model-level
   inputs/outputs are recorded).

Everything goes to ``tests/data/state_golden/`` together with ``manifest.json`` (versions,
exact commands, sha256 of every file, checkpoint key/shape listings and the classes each pickle
references). ``README.md`` / ``FORMATS.md`` there are written by hand from that manifest.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import pickletools
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "state_golden"
CONTROL = "non-targeting"
N_GENES = 64
PERTS = ["GENE003", "GENE010", "GENE017", "GENE024", "GENE031"]
CELL_TYPES = ["ctA", "ctB"]
UNSEEN_PERT = "GENE050"  # in infer input only: not in the trained one-hot map
COMMANDS: list[dict] = []

# --------------------------------------------------------------------------------------------
# ST variants: Hydra overrides on top of ST_COMMON, and the `tx infer` input key.

ST_COMMON = [
    "data.kwargs.pert_col=target_gene",
    "data.kwargs.cell_type_key=cell_type",
    "data.kwargs.batch_col=gem_group",
    f"data.kwargs.control_pert={CONTROL}",
    "data.kwargs.num_workers=0",
    "data.kwargs.pin_memory=false",
    "training.max_steps=2",
    "training.batch_size=4",
    "training.val_freq=1000",
    "training.ckpt_every_n_steps=1000",
    "training.wandb_track=false",
    "use_wandb=false",
    "model.device=cpu",
    "model.kwargs.cell_set_len=8",
    "model.kwargs.hidden_dim=32",
    # keep the (frozen, zeroed) HF token/position tables and the gene decoder tiny
    "++model.kwargs.transformer_backbone_kwargs.vocab_size=4",
    "++model.kwargs.decoder_hidden_dims=[16,16]",
]
LLAMA = [
    "model=state",
    "model.kwargs.transformer_backbone_kwargs.intermediate_size=64",
    "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
    "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
    "model.kwargs.transformer_backbone_kwargs.head_dim=8",
]
GPT2 = [
    "model=pertsets",
    "model.kwargs.n_encoder_layers=2",
    "model.kwargs.n_decoder_layers=2",
    "model.kwargs.transformer_backbone_kwargs.n_layer=2",
    "model.kwargs.transformer_backbone_kwargs.n_head=4",
]
ST_VARIANTS: dict[str, dict] = {
    # input obsm X_hvg (32 HVGs), output the same 32 HVGs ("ST-HVG" style)
    "st_llama_hvg": {
        "overrides": LLAMA + ["data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene"],
        "embed_key": "X_hvg",
    },
    # input X (all 64 log1p genes), output all genes: no embed key
    "st_llama_all": {
        "overrides": LLAMA + ["data.kwargs.embed_key=null", "data.kwargs.output_space=all"],
        "embed_key": None,
    },
    # GPT2 backbone (pertsets.yaml: no basal projection MLP, 2-layer encoders/decoder here)
    "st_gpt2_hvg": {
        "overrides": GPT2 + ["data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene"],
        "embed_key": "X_hvg",
    },
    # embedding input (16-d obsm X_state) with a gene decoder to all 64 genes ("ST-SE" style)
    "st_llama_emb": {
        "overrides": LLAMA + ["data.kwargs.embed_key=X_state", "data.kwargs.output_space=all"],
        "embed_key": "X_state",
    },
    # extra options: 2-layer encoders/decoder, batch encoder, confidence token, GQA (2 kv heads)
    "st_llama_extras": {
        "overrides": LLAMA
        + [
            "data.kwargs.embed_key=X_hvg",
            "data.kwargs.output_space=gene",
            "model.kwargs.n_encoder_layers=2",
            "model.kwargs.n_decoder_layers=2",
            "model.kwargs.batch_encoder=true",
            "model.kwargs.confidence_token=true",
            "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=2",
        ],
        "embed_key": "X_hvg",
    },
}
ST_RUN_FILES = [
    "config.yaml",
    "checkpoints/final.ckpt",
    "var_dims.pkl",
    "pert_onehot_map.pt",
    "cell_type_onehot_map.torch",
    "batch_onehot_map.torch",
    "data_module.torch",
]

SE_OVERRIDES = [
    "embeddings.current=toy",
    "dataset.current=toy",
    "model.emsize=32",
    "model.d_hid=64",
    "model.nhead=4",
    "model.nlayers=2",
    "model.output_dim=16",
    "model.batch_size=8",
    "model.use_flash_attention=false",
    "dataset.pad_length=32",
    "dataset.P=8",
    "dataset.N=8",
    "dataset.S=8",
    "dataset.num_train_workers=1",  # 0 is refused (prefetch_factor is always passed)
    "dataset.num_val_workers=1",
    "experiment.num_epochs=1",
    "experiment.val_check_interval=10",
    "experiment.limit_val_batches=1",
    "experiment.checkpoint.every_n_train_steps=10",
    "wandb.enable=false",
    "experiment.name=se_toy",
    "tokenizer.token_dim=24",
    "optimizer.gradient_accumulation_steps=1",
]


# --------------------------------------------------------------------------------------------
# helpers


def run(cmd: list[str], log: Path, cwd: Path | None = None, what: str = "", check: bool = True) -> int:
    """Run one command, keep its log, record it in COMMANDS; raise on failure if ``check``."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", WANDB_MODE="disabled",
               PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    shown = [c.replace(str(REPO) + "/", "") for c in cmd]
    print("+", " ".join(shown), file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    COMMANDS.append({"what": what, "cmd": shown, "cwd": str(cwd) if cwd else None, "rc": rc})
    if rc != 0 and check:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(shown)}\n{tail}")
    return rc


def state_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("state")), *args]


def wrapped_state_cmd(*args: str, capture: str = "none", capture_out: Path | None = None,
                      seed: int | None = None, cpu_shim: bool = False, safe_numpy: bool = False) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_state", "--capture", capture]
    if safe_numpy:
        cmd += ["--safe-numpy-globals"]
    if capture_out is not None:
        cmd += ["--capture-out", str(capture_out)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if cpu_shim:
        cmd += ["--cpu-shim"]
    return cmd + ["--", *args]


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def keep_module(name: str) -> bool:
    """Sub-module outputs kept for the first call: direct children and backbone blocks."""
    parts = name.split(".")
    return len(parts) == 1 or (len(parts) == 3 and parts[1] in ("layers", "h") and parts[2].isdigit())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flatten(obj, prefix: str, arrays: dict, struct: dict) -> None:
    """Nested dict/list/tuple of tensors/str/numbers -> flat npz arrays + a type description."""
    import torch

    if isinstance(obj, torch.Tensor):
        arrays[prefix] = obj.detach().cpu().numpy()
        struct[prefix] = f"tensor {str(obj.dtype).replace('torch.', '')} {tuple(obj.shape)}"
    elif isinstance(obj, np.ndarray):
        arrays[prefix] = obj
        struct[prefix] = f"ndarray {obj.dtype} {obj.shape}"
    elif isinstance(obj, dict):
        struct[prefix] = f"{type(obj).__name__} keys={list(map(str, obj.keys()))}"
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}", arrays, struct)
    elif isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, str) for v in obj):
            arrays[prefix] = np.asarray(obj, dtype=str)
            struct[prefix] = f"{type(obj).__name__}[str] len={len(obj)}"
        else:
            struct[prefix] = f"{type(obj).__name__} len={len(obj)}"
            for i, v in enumerate(obj):
                flatten(v, f"{prefix}.{i}", arrays, struct)
    elif isinstance(obj, (bool, int, float, str, np.generic)):
        arrays[prefix] = np.asarray(obj)
        struct[prefix] = f"{type(obj).__name__} {obj!r}"
    else:
        struct[prefix] = f"{type(obj).__name__} (not stored)"


# --------------------------------------------------------------------------------------------
# `_state` mode: run the arc-state CLI in-process, optionally seeded / CPU-shimmed / recorded.


def _allow_numpy_scalars() -> None:
    """Allow-list numpy scalars for torch.load(weights_only=True) (torch >= 2.6 default).

    arc-state stores numpy int64 scalars in the hyper_parameters of output_space=all checkpoints,
    and `state tx infer` loads checkpoints with Lightning's default, torch's weights_only=True.
    """
    import torch

    safe = [np.dtype, type(np.dtype(np.int64)), type(np.dtype(np.float32))]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    torch.serialization.add_safe_globals([scalar, *safe])


def _state_mode(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capture", choices=["none", "st", "se"], default="none")
    ap.add_argument("--capture-out")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--cpu-shim", action="store_true")
    ap.add_argument("--safe-numpy-globals", action="store_true")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    rest = a.rest[1:] if a.rest and a.rest[0] == "--" else a.rest

    import random

    import torch

    if a.seed is not None:
        random.seed(a.seed)
        np.random.seed(a.seed)
        torch.manual_seed(a.seed)
    if a.safe_numpy_globals:
        _allow_numpy_scalars()
    if a.cpu_shim:
        # `state emb fit` 0.11.1 calls model.cuda() and builds an NCCL process group.
        import torch.distributed as dist
        from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

        def _noop(self, *args, **kwargs):
            return self

        torch.nn.Module.cuda = _noop
        torch.Tensor.cuda = _noop
        _DeviceDtypeModuleMixin.cuda = _noop
        _ipg = dist.init_process_group

        def _ipg_gloo(backend=None, *args, **kwargs):
            return _ipg("gloo" if backend == "nccl" else backend, *args, **kwargs)

        dist.init_process_group = _ipg_gloo

    calls: list = []
    sub: list = []
    outside: list = []
    if a.capture != "none":
        from torch.nn.modules.module import register_module_forward_hook

        names: dict[int, str] = {}

        def det(x):
            if isinstance(x, torch.Tensor):
                return x.detach().clone()
            if isinstance(x, dict):
                return {k: det(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(det(v) for v in x)
            return x

        inside = [0]

        def post(mod, args, out):
            if id(mod) not in names or not keep_module(names[id(mod)]):
                return
            if inside[0] and len(calls) == 0:
                sub.append((names[id(mod)], det(args), det(out)))
            elif not inside[0] and "." not in names[id(mod)]:
                # a child module called by the CLI outside forward (e.g. the ST gene decoder)
                outside.append((len(calls), names[id(mod)], det(args), det(out)))

        register_module_forward_hook(post)

        if a.capture == "st":
            from state.tx.models.state_transition import StateTransitionPerturbationModel as M

            methods = ["forward"]
        else:
            from state.emb.nn.model import StateEmbeddingModel as M

            methods = ["_compute_embedding_for_batch", "forward"]

        for meth in methods:
            orig = getattr(M, meth)

            def wrapper(self, *args, __orig=orig, __meth=meth, **kwargs):
                if not names:
                    for n, m in self.named_modules():
                        if n:
                            names[id(m)] = n
                rec = {"method": __meth, "args": det(args), "kwargs": det(kwargs),
                       "training": bool(self.training)}
                inside[0] += 1
                try:
                    out = __orig(self, *args, **kwargs)
                finally:
                    inside[0] -= 1
                rec["out"] = det(out)
                calls.append(rec)
                return out

            setattr(M, meth, wrapper)

    sys.argv = ["state", *rest]
    from state.__main__ import main

    try:
        rc = main()
    finally:
        if a.capture != "none":
            torch.save({"calls": calls, "sub": sub, "outside": outside}, a.capture_out)
    return int(rc or 0)


# --------------------------------------------------------------------------------------------
# data


def make_dataset(work: Path) -> dict:
    """Seeded synthetic counts (CSR), obs target_gene / cell_type / gem_group."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(20250)
    genes = [f"GENE{i:03d}" for i in range(N_GENES)]
    base = {ct: rng.gamma(0.8, 2.0, size=N_GENES) for ct in CELL_TYPES}
    rows, obs = [], []
    for ct in CELL_TYPES:
        for p in [CONTROL, *PERTS]:
            n = 40 if p == CONTROL else 20
            mu = base[ct].copy()
            if p != CONTROL:
                mu[genes.index(p)] *= 0.1  # knockdown of the target
                hit = rng.choice(N_GENES, 6, replace=False)
                mu[hit] *= rng.choice([0.3, 3.0], 6)
            for _ in range(n):
                rows.append(rng.poisson(mu * rng.uniform(0.5, 1.5) * 3.0))
                obs.append((p, ct, f"gem{rng.integers(2)}"))
    X = sp.csr_matrix(np.asarray(rows, dtype=np.float32))
    obs_df = pd.DataFrame(obs, columns=["target_gene", "cell_type", "gem_group"])
    obs_df.index = [f"cell{i:04d}" for i in range(len(obs_df))]
    adata = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame({"gene_name": genes}, index=genes))
    raw = work / "toy_raw.h5ad"
    adata.write_h5ad(raw)

    data_dir = work / "data"
    data_dir.mkdir(exist_ok=True)
    proc = data_dir / "toy.h5ad"
    run(state_cmd("tx", "preprocess_train", "--adata", str(raw), "--output", str(proc),
                  "--num_hvgs", "32"), work / "preprocess.log", what="tx preprocess_train")

    # synthetic 16-d "SE embedding" for the embedding-input variant
    p = ad.read_h5ad(proc)
    W = np.random.default_rng(77).normal(0, 0.3, size=(p.obsm["X_hvg"].shape[1], 16))
    p.obsm["X_state"] = np.tanh(np.asarray(p.obsm["X_hvg"], dtype=np.float64) @ W).astype(np.float32)
    p.write_h5ad(proc)

    toml = work / "split.toml"
    toml.write_text(
        f'[datasets]\ntoy = "{data_dir}"\n\n[training]\ntoy = "train"\n\n[zeroshot]\n\n'
        '[fewshot]\n[fewshot."toy.ctA"]\nval = ["GENE031"]\ntest = ["GENE024", "GENE031"]\n'
    )

    # tx infer input: 57 cells, rows shuffled, 3 cells labelled with an unseen perturbation
    rng = np.random.default_rng(7)
    idx = []
    for ct in CELL_TYPES:
        for pert in [CONTROL, "GENE003", "GENE024", "GENE031"]:
            w = np.where((p.obs.cell_type == ct) & (p.obs.target_gene == pert))[0]
            idx += list(rng.choice(w, 12 if pert == CONTROL else 5, replace=False))
    w = np.where((p.obs.cell_type == "ctA") & (p.obs.target_gene == "GENE010"))[0]
    unseen = list(rng.choice(w, 3, replace=False))
    idx = np.asarray(idx + unseen)
    order = rng.permutation(idx.size)
    sub = p[idx[order]].copy()
    sub.obs["target_gene"] = sub.obs["target_gene"].astype(str)
    sub.obs.loc[np.isin(idx[order], unseen), "target_gene"] = UNSEEN_PERT
    sub.obs["target_gene"] = sub.obs["target_gene"].astype("category")
    infer_in = work / "infer_input.h5ad"
    sub.write_h5ad(infer_in)
    return {"raw": raw, "proc": proc, "toml": toml, "infer_in": infer_in}


# --------------------------------------------------------------------------------------------
# ST


def st_variant(name: str, spec: dict, work: Path, files: dict, out: Path) -> dict:
    import anndata as ad
    import torch

    runs = work / "runs"
    run(state_cmd("tx", "train", f"data.kwargs.toml_config_path={files['toml']}", *ST_COMMON,
                  *spec["overrides"], f"output_dir={runs}", f"name={name}"),
        work / f"{name}_train.log", what=f"{name}: tx train")
    rdir = runs / name
    vdir = out / name
    (vdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for f in ST_RUN_FILES:
        shutil.copy2(rdir / f, vdir / f)

    # tx infer (recorded)
    cap = work / f"{name}_infer_capture.pt"
    pred_path = work / f"{name}_infer_output.h5ad"
    args = ["tx", "infer", "--model-dir", str(rdir), "--checkpoint", str(rdir / "checkpoints/final.ckpt"),
            "--adata", str(files["infer_in"]), "--pert-col", "target_gene", "--celltype-col", "cell_type",
            "--batch-col", "gem_group", "--control-pert", CONTROL, "--seed", "42",
            "--output", str(pred_path)]
    if spec["embed_key"]:
        args[args.index("--pert-col"):args.index("--pert-col")] = ["--embed-key", spec["embed_key"]]
    rc = run(wrapped_state_cmd(*args, capture="st", capture_out=cap), work / f"{name}_infer.log",
             what=f"{name}: tx infer", check=False)
    notes = []
    if rc != 0:
        log = (work / f"{name}_infer.log").read_text(errors="replace")
        if "WeightsUnpickler" not in log:
            raise RuntimeError(f"{name}: tx infer failed (rc={rc})\n{log[-3000:]}")
        notes.append("plain `tx infer` failed: torch.load(weights_only=True) refuses the numpy scalars "
                     "in hyper_parameters; rerun with numpy scalar/dtype allow-listed "
                     "(torch.serialization.add_safe_globals) in the wrapper")
        # keep only the final error line (never arc-state's traceback/source lines)
        notes.append(next(ln for ln in reversed(log.splitlines()) if "WeightsUnpickler error" in ln).strip()[:300])
        run(wrapped_state_cmd(*args, capture="st", capture_out=cap, safe_numpy=True),
            work / f"{name}_infer_safe.log", what=f"{name}: tx infer (numpy scalars allow-listed)")
    shutil.copy2(pred_path, vdir / "infer_output.h5ad")

    inp = ad.read_h5ad(files["infer_in"])
    X_in = _dense(inp.obsm[spec["embed_key"]] if spec["embed_key"] else inp.X)
    C = torch.load(cap, weights_only=False)
    arrays: dict = {}
    struct: dict = {}
    for i, c in enumerate(C["calls"]):
        flatten(c["args"], f"call{i}.args", arrays, struct)
        flatten(c["kwargs"], f"call{i}.kwargs", arrays, struct)
        flatten(c["out"], f"call{i}.out", arrays, struct)
        basal = c["args"][0]["ctrl_cell_emb"].numpy()
        rows = np.full(basal.shape[0], -1, dtype=np.int64)
        for r in range(basal.shape[0]):
            hit = np.where((X_in == basal[r]).all(1))[0]
            rows[r] = hit[0] if hit.size else -1
        arrays[f"call{i}.input_rows"] = rows  # rows of the infer input used as ctrl_cell_emb
    for modname, _a, o in C["sub"]:
        flatten(o, f"call0.module.{modname}", arrays, struct)
    for j, (after, modname, a_, o) in enumerate(C["outside"]):
        arrays[f"outside{j}.after_call"] = np.asarray(after)
        arrays[f"outside{j}.module"] = np.asarray(modname)
        flatten(a_, f"outside{j}.args", arrays, struct)
        flatten(o, f"outside{j}.out", arrays, struct)
    arrays["n_outside"] = np.asarray(len(C["outside"]))
    arrays["n_calls"] = np.asarray(len(C["calls"]))
    # where each row of the written prediction comes from: (call index, row in that call's output)
    res = ad.read_h5ad(pred_path)
    Y = _dense(res.obsm[spec["embed_key"]] if spec["embed_key"] else res.X)
    outs = [_main_output(c["out"]).numpy() for c in C["calls"]]
    src = np.full((Y.shape[0], 2), -1, dtype=np.int64)
    for r in range(Y.shape[0]):
        for ci, o in enumerate(outs):
            if o.shape[-1] != Y.shape[1]:
                continue
            hit = np.where((np.clip(o, 0.0, 14.0) == Y[r]).all(1))[0]
            if hit.size:
                src[r] = (ci, hit[0])
                break
    arrays["infer_output_source"] = src
    # infer may also write decoded genes into X (embedding-input variants): match them to the
    # recorded gene-decoder calls
    X_out = _dense(res.X)
    if spec["embed_key"] and not np.array_equal(X_out, _dense(inp.X)):
        douts = [_main_output(o).numpy().reshape(-1, X_out.shape[1]) for (_a, n, _i, o) in C["outside"]
                 if n == "gene_decoder"]
        xsrc = np.full((X_out.shape[0], 2), -1, dtype=np.int64)
        for r in range(X_out.shape[0]):
            for j, o in enumerate(douts):
                hit = np.where((np.clip(o, 0.0, 14.0) == X_out[r]).all(1))[0]
                if hit.size:
                    xsrc[r] = (j, hit[0])
                    break
        arrays["infer_output_X_source"] = xsrc
    np.savez_compressed(vdir / "infer_forward_calls.npz", **arrays)

    # direct forward on one padded batch (2 sets x cell_set_len), and the same cells unpadded
    fwd = work / f"{name}_forward.pt"
    run([sys.executable, str(Path(__file__).resolve()), "_forward", str(vdir / "checkpoints/final.ckpt"),
         str(fwd)], work / f"{name}_forward.log", what=f"{name}: python forward")
    F = torch.load(fwd, weights_only=False)
    arrays, s2 = {}, {}
    flatten(F, "fwd", arrays, s2)
    np.savez_compressed(vdir / "forward_padded.npz", **arrays)
    struct.update(s2)
    return {"infer_calls": len(C["calls"]), "notes": notes, "structure": struct}


def _main_output(out):
    """The prediction tensor of an ST forward output (a tensor, or the first tensor of a tuple)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    raise TypeError(type(out))


def _forward_mode(ckpt: str, out: str) -> int:
    """Call the ST model directly: batch of 2 sets (padded=True) and the first set (padded=False)."""
    import torch
    from state.tx.models.state_transition import StateTransitionPerturbationModel as M

    _allow_numpy_scalars()
    m = M.load_from_checkpoint(ckpt, map_location="cpu")
    m.eval()
    S = int(m.hparams["cell_set_len"])
    D = int(m.hparams["input_dim"])
    P = int(m.hparams["pert_dim"])
    g = torch.Generator().manual_seed(123)
    x = torch.rand(2 * S, D, generator=g) * 3.0
    pe = torch.zeros(2 * S, P)
    pe[:S, 0] = 1.0
    pe[S:, P - 2] = 1.0
    res = {"cell_set_len": S, "ctrl_cell_emb": x, "pert_emb": pe}
    with torch.no_grad():
        batch = {"ctrl_cell_emb": x, "pert_emb": pe, "pert_name": ["p"] * (2 * S)}
        if int(m.hparams.get("batch_dim") or 0) > 0 and m.hparams.get("batch_encoder"):
            bidx = torch.tensor([0, 1] * S)
            batch["batch"] = bidx
            res["batch"] = bidx
        try:
            res["out_padded"] = m.forward(batch, padded=True)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            res["error_padded"] = repr(e)
        b1 = {k: v[:S] for k, v in batch.items()}
        try:
            res["out_set0_unpadded"] = m.forward(b1, padded=False)
        except Exception as e:  # noqa: BLE001
            res["error_unpadded"] = repr(e)
    torch.save(res, out)
    return 0


# --------------------------------------------------------------------------------------------
# SE


def se_part(work: Path, files: dict, out: Path) -> dict:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch

    se = work / "se"
    se.mkdir(exist_ok=True)
    sdir = out / "se"
    sdir.mkdir(parents=True, exist_ok=True)
    raw = ad.read_h5ad(files["raw"])
    g = torch.Generator().manual_seed(5)
    table = {n: torch.randn(24, generator=g) for n in raw.var_names}
    torch.save(table, se / "protein_embeddings.pt")
    for split in ("train", "val"):
        pd.DataFrame({"species": ["human"], "path": [str(files["raw"])], "names": ["toy"]}).to_csv(
            se / f"{split}.csv", index=False)
    import state

    cfg = se / "se-config.yaml"
    shutil.copy2(Path(state.__file__).parent / "configs" / "state-defaults.yaml", cfg)
    run(state_cmd("emb", "preprocess", "--profile-name", "toy", "--train-csv", str(se / "train.csv"),
                  "--val-csv", str(se / "val.csv"), "--output-dir", str(se / "profile"),
                  "--config-file", str(cfg), "--all-embeddings", str(se / "protein_embeddings.pt")),
        se / "preprocess.log", cwd=se, what="se: emb preprocess")
    ck = se / "ckpt"
    run(wrapped_state_cmd("emb", "fit", "--conf", str(cfg), *SE_OVERRIDES,
                          f"experiment.checkpoint.path={ck}", cpu_shim=True),
        se / "fit.log", cwd=se, what="se: emb fit (CPU shim)")
    finals = sorted(ck.glob("*_final.pt"))
    assert len(finals) == 1, finals
    shutil.copy2(finals[0], sdir / "final.pt")
    (sdir / "profile").mkdir(exist_ok=True)
    for f in ("ds_emb_mapping_toy.torch", "valid_genes_masks_toy.torch"):
        shutil.copy2(se / "profile" / f, sdir / "profile" / f)
    shutil.copy2(se / "protein_embeddings.pt", sdir / "protein_embeddings.pt")

    # transform inputs: (a) tie-free, >= pad_length expressed genes -> deterministic
    rng = np.random.default_rng(9)
    pick = np.sort(np.random.default_rng(3).choice(raw.n_obs, 40, replace=False))
    tf = raw[pick].copy()
    Xtf = np.stack([rng.permutation(N_GENES) - 15 for _ in range(tf.n_obs)]).clip(0).astype(np.float32)
    tf.X = sp.csr_matrix(Xtf)  # 48 expressed genes per cell, distinct counts 1..48
    tf.write_h5ad(sdir / "transform_input_tiefree.h5ad")
    # (b) realistic counts (ties, zeros): sentence sampling is random -> seeded, recorded
    real = raw[pick].copy()
    real.write_h5ad(sdir / "transform_input_counts.h5ad")

    res = {"final_ckpt_name": finals[0].name}
    for case, seed in (("tiefree", None), ("counts", 0)):
        outs = []
        for rep in (1, 2):
            o = se / f"transform_{case}_{rep}.h5ad"
            cap = se / f"transform_{case}_{rep}.pt"
            run(wrapped_state_cmd("emb", "transform", "--checkpoint", str(sdir / "final.pt"),
                                  "--input", str(sdir / f"transform_input_{case}.h5ad"), "--output", str(o),
                                  "--embed-key", "X_state", "--batch-size", "8",
                                  capture="se", capture_out=cap, seed=seed),
                se / f"transform_{case}_{rep}.log", what=f"se: emb transform {case} (run {rep})")
            outs.append(np.asarray(ad.read_h5ad(o).obsm["X_state"]))
        res[f"{case}_rerun_max_abs_diff"] = float(np.abs(outs[0] - outs[1]).max())
        np.save(sdir / f"transform_{case}_X_state.npy", outs[0].astype(np.float32))
        C = torch.load(se / f"transform_{case}_1.pt", weights_only=False)
        arrays, struct = {}, {}
        for i, c in enumerate(C["calls"]):
            flatten(c["args"], f"call{i}.{c['method']}.args", arrays, struct)
            flatten(c["kwargs"], f"call{i}.{c['method']}.kwargs", arrays, struct)
            flatten(c["out"], f"call{i}.{c['method']}.out", arrays, struct)
        for modname, _a, o in C["sub"]:
            flatten(o, f"call0.module.{modname}", arrays, struct)
        for j, (_after, modname, a_, o) in enumerate(C["outside"]):
            arrays[f"outside{j}.module"] = np.asarray(modname)
            flatten(a_, f"outside{j}.args", arrays, struct)
            flatten(o, f"outside{j}.out", arrays, struct)
        arrays["n_calls"] = np.asarray(len(C["calls"]))
        np.savez_compressed(sdir / f"transform_{case}_calls.npz", **arrays)
        res[f"{case}_structure"] = struct
    return res


# --------------------------------------------------------------------------------------------
# inspection of saved files (for the manifest / FORMATS.md)


def pickle_globals(data: bytes) -> list[str]:
    """Classes/functions a pickle stream references (GLOBAL / STACK_GLOBAL), without loading it."""
    found, strings, memo = set(), [], {}
    for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                    "BINSTRING", "STRING"):
            strings.append(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            if strings:
                memo[arg] = strings[-1]
        elif name == "MEMOIZE":
            if strings:
                memo[len(memo)] = strings[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if arg in memo:
                strings.append(memo[arg])
        elif name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
    return sorted(found)


def file_pickle_globals(path: Path) -> list[str]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            return pickle_globals(z.read(name))
    return pickle_globals(path.read_bytes())


def describe(obj, depth: int = 0):
    import torch

    if isinstance(obj, torch.Tensor):
        return f"Tensor {str(obj.dtype).replace('torch.', '')} {list(obj.shape)}"
    if isinstance(obj, np.ndarray):
        return f"ndarray {obj.dtype} {list(obj.shape)}"
    if isinstance(obj, dict):
        if depth >= 2:
            return f"{type(obj).__name__} ({len(obj)} keys)"
        return {str(k): describe(v, depth + 1) for k, v in list(obj.items())[:80]}
    if isinstance(obj, (list, tuple)):
        inner = sorted({type(v).__name__ for v in obj})
        return f"{type(obj).__name__} len={len(obj)} of {inner}"
    return f"{type(obj).__name__}: {repr(obj)[:80]}"


def inspect_outputs(out: Path) -> dict:
    import pickle

    import torch

    info: dict = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.suffix in (".md", ".json"):
            continue
        rel = str(p.relative_to(out))
        entry: dict = {"bytes": p.stat().st_size, "sha256": sha256(p)}
        if p.suffix in (".ckpt", ".pt", ".torch", ".pkl"):
            entry["pickle_globals"] = file_pickle_globals(p)
            entry["torch_zip"] = zipfile.is_zipfile(p)
            obj = torch.load(p, map_location="cpu", weights_only=False) if entry["torch_zip"] else pickle.loads(
                p.read_bytes())
            if isinstance(obj, dict) and "state_dict" in obj:
                entry["top_level_keys"] = list(obj.keys())
                entry["state_dict"] = {k: f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
                                       for k, v in obj["state_dict"].items()}
                entry["hyper_parameters"] = describe(obj.get("hyper_parameters", {}), 1)
                entry["optimizer_states"] = (f"list len={len(obj.get('optimizer_states', []))}")
                for k in ("cfg_yaml", "protein_embeds_dict"):
                    if k in obj:
                        entry[k] = describe(obj[k], 1) if k != "cfg_yaml" else f"str ({len(obj[k])} chars)"
            else:
                entry["content"] = describe(obj)
        info[rel] = entry
    return info


def versions() -> dict:
    from importlib.metadata import version

    v = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("arc-state", "cell-load", "torch", "transformers", "lightning", "anndata", "scanpy",
                "numpy", "scipy", "h5py", "hydra-core", "geomloss", "peft"):
        try:
            v[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            v[pkg] = None
    return v


# --------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_state":
        return _state_mode(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_forward":
        return _forward_mode(sys.argv[2], sys.argv[3])

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/state_golden_work", help="scratch directory (recreated)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", nargs="*", help="ST variants to rebuild (default: all); 'se' for SE. Other "
                    "variants' directories are kept, but manifest.json then lists only this run")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    only = set(a.only) if a.only else None
    for p in out.iterdir():  # keep hand-written docs (and, with --only, the other variants)
        if p.name in ("README.md", "FORMATS.md") or (only is not None and p.is_dir() and p.name not in only
                                                      and p.name != "data"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    files = make_dataset(work)
    (out / "data").mkdir(exist_ok=True)
    shutil.copy2(files["raw"], out / "data" / "toy_raw.h5ad")
    shutil.copy2(files["proc"], out / "data" / "toy.h5ad")
    shutil.copy2(files["toml"], out / "data" / "split.toml")
    shutil.copy2(files["infer_in"], out / "data" / "infer_input.h5ad")

    results: dict = {}
    for name, spec in ST_VARIANTS.items():
        if only is not None and name not in only:
            continue
        try:
            results[name] = {"ok": True, "overrides": ST_COMMON + spec["overrides"],
                             "embed_key": spec["embed_key"], **st_variant(name, spec, work, files, out)}
        except Exception as e:  # noqa: BLE001 - a failing variant is recorded, not fatal
            results[name] = {"ok": False, "error": str(e)[-4000:]}
            shutil.rmtree(out / name, ignore_errors=True)
            print(f"!! {name} failed: {str(e)[-800:]}", file=sys.stderr)
    if only is None or "se" in only:
        try:
            results["se"] = {"ok": True, "overrides": SE_OVERRIDES, **se_part(work, files, out)}
        except Exception as e:  # noqa: BLE001
            results["se"] = {"ok": False, "error": str(e)[-4000:]}
            print(f"!! se failed: {str(e)[-800:]}", file=sys.stderr)

    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True)
    (out / "pip_freeze.txt").write_text(freeze.stdout)

    manifest = {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "script": "scripts/make_state_golden.py",
        "versions": versions(),
        "commands": COMMANDS,
        "results": results,
        "files": inspect_outputs(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)", file=sys.stderr)
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
