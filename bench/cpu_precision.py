"""Why ``precision=auto`` trains in bf16 on CPUs with native bf16: GEMM rates, step time, demo quality.

Three measurements, all on the CPU (2 threads by default):

1. GEMM throughput (GFLOP/s) of ``torch.mm`` in fp32 and bf16 at the ``state`` preset's shapes
   (set 64 x 2 sets: 128 x 696 x 2784; set 512: 512 x 696 x 2784) and at 2048^3;
2. ``--step``: seconds per training step of the ``state`` preset (1,500 genes, 2 sets of 64,
   energy loss, fused AdamW, gradient clipping) in fp32, in bf16 autocast and, with
   ``--compile``, in fp32 under ``torch.compile`` (the compiled step's first call is excluded);
3. ``--demo``: the normalised VCC score and ``pearson_true`` of ``state`` in ``celltwin demo``
   (models cell-mean and state) trained in fp32 and in bf16, for each ``--seeds`` value.

    python bench/cpu_precision.py --step --compile --demo --seeds 0 1
    python bench/cpu_precision.py --profile     # where the fp32 step's time goes (set 64 and 512)

Prints whether this CPU has native bf16 (``celltwin.train.cpu_has_native_bf16``), i.e. what
``precision=auto`` picks here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch


def gemm_rates(reps: int = 10) -> None:
    for m, k, n in ((128, 696, 2784), (512, 696, 2784), (2048, 2048, 2048)):
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(m, k).to(dtype)
            b = torch.randn(k, n).to(dtype)
            for _ in range(3):
                a @ b
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            dt = (time.perf_counter() - t) / reps
            row.append(f"{str(dtype).removeprefix('torch.')} {2 * m * k * n / dt / 1e9:6.0f} GFLOP/s")
        print(f"mm {m} x {k} x {n}: " + ", ".join(row), flush=True)


def step_time(mode: str, steps: int = 10, genes: int = 1500, set_size: int = 64, sets: int = 2,
              profile: bool = False) -> float:
    """Median seconds per optimiser step of the state preset (first 2 steps excluded).

    ``profile``: also print the share of the profiled steps' CPU time spent in matrix products
    (``aten::mm`` / ``addmm`` / ``bmm``) and in attention (``scaled_dot_product`` kernels).
    """
    from celltwin.models import StateTransition, STConfig

    torch.manual_seed(0)
    model = StateTransition(STConfig.from_preset("state", input_dim=genes, n_perts=50, n_contexts=2,
                                                 set_size=set_size))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fwd = torch.compile(model) if mode == "compile" else model
    g = torch.Generator().manual_seed(0)
    times = []
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        prof = torch_profile(activities=[ProfilerActivity.CPU])
    for i in range(steps + 2):
        if prof is not None and i == 2:
            prof.__enter__()
        ctrl = torch.log1p(torch.poisson(torch.rand(sets, set_size, genes, generator=g) * 2))
        pert = torch.log1p(torch.poisson(torch.rand(sets, set_size, genes, generator=g) * 2.5))
        pid = torch.randint(0, 50, (sets,), generator=g)
        cid = torch.randint(0, 2, (sets,), generator=g)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = fwd(ctrl, pid, cid)
            loss = model.loss(out, pert)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    if prof is not None:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        att = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        print(f"  profile ({mode}, set {set_size} x {sets}): matrix products {mm / total:.0%}, "
              f"attention {att / total:.0%} of the CPU time", flush=True)
    return statistics.median(times)


def demo_scores(seeds: list[int]) -> None:
    import pandas as pd

    from celltwin.demo import DemoConfig, run_demo

    for seed in seeds:
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory(prefix="celltwin-prec-") as tmp:
                t = time.perf_counter()
                run_demo(tmp, DemoConfig(seed=seed, models=("cell-mean", "state"), report=False,
                                         model_options={"state": {"precision": precision}}))
                row = pd.read_csv(f"{tmp}/summary.csv").set_index("model").loc["state"]
            print(f"demo seed {seed} state {precision}: score {row['score']:.3f}, pearson_true "
                  f"{row['pearson_true']:.3f}, DES {row['DES']:.3f}, PDS {row['PDS']:.3f} "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step", action="store_true", help="time the state preset's training step")
    ap.add_argument("--compile", action="store_true", help="with --step: also fp32 under torch.compile")
    ap.add_argument("--demo", action="store_true", help="demo scores of state in fp32 and bf16")
    ap.add_argument("--profile", action="store_true",
                    help="share of matrix products and attention in the fp32 step at set 64 x 2 and 512 x 1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from celltwin.train import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()} "
          f"(precision=auto -> {'bf16' if cpu_has_native_bf16() else 'fp32'} on this CPU)", flush=True)
    gemm_rates()
    if args.step:
        for mode in ("fp32", "bf16") + (("compile",) if args.compile else ()):
            print(f"state preset step ({mode}): {step_time(mode):.3f} s", flush=True)
    if args.profile:
        for set_size, sets in ((64, 2), (512, 1)):
            step_time("fp32", steps=3, set_size=set_size, sets=sets, profile=True)
    if args.demo:
        demo_scores(args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
