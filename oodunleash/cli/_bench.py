"""``oodunleash demo`` and ``oodunleash benchmark``: the Fashion-MNIST runs, imported only when
one of them is asked for."""

from __future__ import annotations

import argparse
import time

from oodunleash.cli import _inputs

__all__ = ["cmd_benchmark", "cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small CNN, tune it on validation data, compare tune's choice on test."""
    from oodunleash.bench.demo import run_demo

    run_demo(
        args.out,
        dataset=args.dataset,
        quick=args.quick,
        device=_inputs.device(args.device),
        seed=args.seed,
        xi_factor=args.xi_factor,
        progress=not args.no_progress,
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """The Fashion-MNIST benchmark (docs/benchmarks.md)."""
    from oodunleash.bench.grid import parse_finetune
    from oodunleash.bench.report import summarize
    from oodunleash.bench.run import run_benchmark

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
            device=_inputs.device(args.device),
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
