"""Command line: ``oodunleash demo`` and ``oodunleash benchmark``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oodunleash",
        description="Unleashing Mask (UM / UMAP) for out-of-distribution detection.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="Train a small CNN, run UM and UMAP, print a before/after table (no download).",
        description="End-to-end demo on Fashion-MNIST if its files are found, else on "
        "scikit-learn's digits. About 3 minutes on 2 CPU cores.",
    )
    demo.add_argument("--out", default="oodunleash-demo", help="output directory")
    demo.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    demo.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    demo.add_argument("--device", default="auto", help="torch device (default: cuda if any)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--xi-factor",
        type=float,
        default=2.0,
        help="ξ as a multiple of the final training loss (default 2)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    bench = sub.add_parser(
        "benchmark",
        help="Fashion-MNIST benchmark: per-epoch OOD curves, ξ recipes, final vs control vs "
        "UM vs UMAP over seeds.",
        description="Writes <out>/seeds/*.json, <out>/results.json, <out>/results.md and "
        "plots. See docs/benchmarks.md for the protocol.",
    )
    bench.add_argument(
        "--settings",
        nargs="+",
        default=["small_cnn", "resnet18"],
        help="models, optionally with options: small_cnn, resnet18, small_cnn:noise=0.2, "
        "small_cnn:epochs=40",
    )
    bench.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    bench.add_argument("--out", default="runs/benchmark", help="output directory")
    bench.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    bench.add_argument("--device", default="auto", help="torch device (default: cuda if any)")
    bench.add_argument("--jobs", type=int, default=1, help="(setting, seed) runs in parallel")
    bench.add_argument("--train-size", type=int, default=None, help="subsample the ID train set")
    bench.add_argument(
        "--checkpoints",
        choices=("all", "final", "none"),
        default="all",
        help="which per-epoch safetensors checkpoints to keep",
    )
    bench.add_argument(
        "--eval-cap", type=int, default=None, help="subsample every val/test set (smoke tests)"
    )
    bench.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; fine-tunes that would start later are skipped (the grid is ordered by "
        "priority)",
    )
    bench.add_argument("--quick", action="store_true", help="a tiny fine-tune grid (smoke test)")
    bench.add_argument(
        "--grid",
        nargs="+",
        default=None,
        help="fine-tunes to run instead of the default grid, e.g. um/train_x4/lr0.01/ep10",
    )
    bench.add_argument(
        "--scores",
        nargs="+",
        default=None,
        help="OOD scores to report (default: oodunleash.benchmark.ALL_SCORES); any registered "
        "name, e.g. vim gradnorm. A resumed run keeps the scores it started with",
    )
    bench.add_argument("--no-curve", action="store_true", help="skip the per-epoch OOD evaluation")
    bench.add_argument(
        "--resume",
        action="store_true",
        help="start from an earlier run in --out (its per-seed JSON and final checkpoint) and "
        "run only the fine-tunes it lacks",
    )
    bench.add_argument(
        "--summarize-only",
        action="store_true",
        help="only aggregate existing <out>/seeds/*.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oodunleash`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from .bench.demo import run_demo

        run_demo(
            args.out,
            dataset=args.dataset,
            quick=args.quick,
            device=_device(args.device),
            seed=args.seed,
            xi_factor=args.xi_factor,
            progress=not args.no_progress,
        )
        return 0
    from .bench.grid import parse_finetune
    from .bench.report import summarize
    from .bench.run import run_benchmark

    if args.summarize_only:
        summarize(args.out)
    else:
        run_benchmark(
            args.settings,
            args.seeds,
            args.out,
            jobs=args.jobs,
            quick=args.quick,
            dataset=args.dataset,
            device=_device(args.device),
            train_size=args.train_size,
            checkpoints=args.checkpoints,
            eval_cap=args.eval_cap,
            curve=not args.no_curve,
            resume=args.resume,
            **({"grid": [parse_finetune(g) for g in args.grid]} if args.grid else {}),
            **({"scores": args.scores} if args.scores else {}),
            deadline=None if args.time_budget is None else time.time() + args.time_budget,
        )
    print(f"Results: {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
