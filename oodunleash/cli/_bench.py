"""``oodunleash demo`` and ``oodunleash benchmark``: the Fashion-MNIST runs, imported only when
one of them is asked for."""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

from . import _inputs

__all__ = ["cmd_benchmark", "cmd_demo"]


def _bench(name: str, new_module: str, old_module: str) -> Any:
    """``oodunleash.bench.<new_module>.<name>``, or ``oodunleash.<old_module>.<name>`` where
    the bench package does not exist (yet)."""
    try:
        module = importlib.import_module(f"oodunleash.bench.{new_module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("oodunleash.bench", f"oodunleash.bench.{new_module}"):
            raise
        module = importlib.import_module(f"oodunleash.{old_module}")
    return getattr(module, name)


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small CNN, run UM and UMAP, print a before/after table."""
    run_demo = _bench("run_demo", "demo", "demo")
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
    parse_finetune = _bench("parse_finetune", "grid", "benchmark")
    run_benchmark = _bench("run_benchmark", "run", "benchmark")
    summarize = _bench("summarize", "report", "benchmark")
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
