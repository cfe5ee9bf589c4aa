"""The ``oodunleash`` argument parser: one sub-command per task."""

from __future__ import annotations

import argparse

from oodunleash.cli import _bench, _evaluate, _push, _train
from oodunleash.cli._data import parse_named_dir
from oodunleash.cli._errors import EXIT_CODES_HELP
from oodunleash.cli._preprocessing import default_workers
from oodunleash.config import DEFAULT_CONSTRAINT_FACTOR, UnleashConfig

__all__ = ["build_parser"]

_MODEL_HELP = (
    "a timm architecture name (random weights unless --checkpoint), an hf-hub:<repo> id, or a "
    "checkpoint folder written by `oodunleash fit --out` / OODUnleash.save_pretrained"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (exit codes, examples)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _parents() -> dict[str, argparse.ArgumentParser]:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    model.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights for a timm MODEL: .safetensors, or a .pt/.pth state dict (read with "
        "torch.load(weights_only=True))",
    )
    model.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="classifier size of a timm MODEL (default: from the checkpoint or the data)",
    )
    data = argparse.ArgumentParser(add_help=False)
    group = data.add_argument_group("preprocessing and loading")
    group.add_argument(
        "--img-size",
        type=_positive_int,
        metavar="N",
        help="input size (default: the checkpoint's recorded preprocessing, else timm's config)",
    )
    group.add_argument("--mean", type=float, nargs="+", metavar="X", help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", metavar="X", help="normalisation std")
    group.add_argument("--crop-pct", type=float, metavar="X", help="resize to size/X, crop centre")
    group.add_argument(
        "--interpolation",
        choices=("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
        help="resize filter (default: the checkpoint's, else timm's for the architecture)",
    )
    group.add_argument("--batch-size", type=_positive_int, default=64, metavar="N")
    workers = default_workers()
    group.add_argument(
        "--workers",
        type=int,
        default=workers,
        metavar="N",
        help=f"data loading processes (default here: {workers}, one core left free, at most 4)",
    )
    runtime = argparse.ArgumentParser(add_help=False)
    runtime.add_argument("--device", default="auto", help="torch device (default: cuda if any)")
    runtime.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return {"model": model, "data": data, "runtime": runtime}


def _tune_candidates() -> str:
    """What ``tune`` tries by default, for its help."""
    from oodunleash.scores import ScoreSpec
    from oodunleash.tuning import DEFAULT_FINETUNES, SCORE_GRID

    # The labels --scores takes back ("knn k=1"; the registered default is the bare name).
    grids = "; ".join(
        ", ".join(ScoreSpec(name, {option: v}).label for v in values)
        for name, (option, _, values) in SCORE_GRID.items()
    )
    return (
        "candidates: the unchanged model (always), and the fine-tunes "
        f"{', '.join(repr(n) for n in DEFAULT_FINETUNES)}: each is screened with a quarter "
        "epoch of its recipe, and the best --promote of them within the accuracy floor get the "
        "full schedule (the choice is made on fully trained ones only). Identical models are "
        "read out once.\n"
        f"scores: every registered score (oodunleash list-scores), with the variants {grids}; "
        "and on each candidate the fusions of its --fusion best score families (labels such "
        "as 'knn k=1 + energy').\n"
        "It says up front what it will run and about how long it takes, and ends with the "
        "validation table, the choice and the folder it saved."
    )


def _add_tune(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    """The ``tune`` command's own options (the data options it shares with ``fit`` follow)."""
    tune = sub.add_parser(
        "tune",
        parents=parents,
        formatter_class=_Formatter,
        help="search UM/UMAP settings on an image folder, save the best",
        description="Try several fine-tunes of MODEL on --train-dir, keep the best one whose "
        "validation accuracy drops by at most --max-accuracy-drop points, and save it.\n\n"
        + _tune_candidates(),
        epilog="example:\n  oodunleash tune resnet18 --checkpoint resnet18.safetensors "
        "--train-dir data/train --val-dir data/val --ood-dir noise=data/noise --out best\n\n"
        + EXIT_CODES_HELP,
    )
    tune.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS")
    tune.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="drop the candidates whose estimated cost no longer fits (the unchanged model is "
        "always read out)",
    )
    tune.add_argument(
        "--finetunes",
        nargs="*",
        metavar="NAME",
        help="fine-tunes to try instead of the default ones (none: post-hoc scores only), e.g. "
        "--finetunes um 'umap control' 'um 2x'",
    )
    tune.add_argument(
        "--scores",
        nargs="+",
        metavar="NAME",
        help="scores to try instead of every registered one (see list-scores); a name with a "
        "grid expands to its variants, a label such as 'knn k=1' is that variant alone",
    )
    tune.add_argument(
        "--promote",
        type=_positive_int,
        default=1,
        metavar="N",
        help="fine-tunes trained on the full schedule after the quarter-epoch screening of all",
    )
    tune.add_argument(
        "--fusion",
        type=_count,
        default=3,
        metavar="N",
        help="also try fused scores: every combination of each candidate's N best score "
        "families, z-normalised on the validation images and averaged (0: single scores only)",
    )
    tune.add_argument("--json", metavar="PATH", help="write the report as JSON")
    tune.add_argument("--plot", metavar="PATH", help="draw the trade-off plot")
    tune.add_argument("--out", default="unleashed", metavar="DIR", help="best checkpoint folder")
    tune.add_argument(
        "--ood-dir", type=parse_named_dir, action="append", metavar="NAME=DIR", help="OOD images"
    )
    return tune


def _add_training(sub: argparse._SubParsersAction, parents: list) -> None:
    fit = sub.add_parser(
        "fit",
        parents=parents,
        formatter_class=_Formatter,
        help="fine-tune MODEL with UM or UMAP on an image folder and save it",
        description="Fine-tune MODEL on --train-dir (one sub-folder per class) with the flooding "
        "loss around ξ (UM: the weights; UMAP: a pruning mask), then save the checkpoint with the "
        "preprocessing used.",
        epilog="example:\n  oodunleash fit resnet18 --checkpoint resnet18.safetensors "
        "--train-dir data/train --val-dir data/val --img-size 64 --out unleashed-resnet18\n\n"
        + EXIT_CODES_HELP,
    )
    fit.add_argument("--method", choices=("um", "umap"), default="um")
    fit.add_argument("--lr", type=float, help="default 0.01 (UM) or 0.1 (UMAP)")
    xi_help = f"ξ (default: {DEFAULT_CONSTRAINT_FACTOR:g}x the training CE)"
    fit.add_argument("--loss-constraint", type=float, metavar="XI", help=xi_help)
    fit.add_argument("--keep-ratio", type=float, help="UMAP: fraction of weights kept")
    fit.add_argument("--amp", action="store_true", help="mixed precision")
    fit.add_argument(
        "--score", default=UnleashConfig.score, help="default OOD score of the checkpoint"
    )
    fit.add_argument("--out", default="unleashed", metavar="DIR", help="checkpoint folder")
    tune = _add_tune(sub, parents)
    for parser, handler in ((fit, _train.cmd_fit), (tune, _train.cmd_tune)):
        parser.add_argument("--train-dir", required=True, metavar="DIR", help="ID training images")
        parser.add_argument(
            "--val-dir", required=parser is tune, metavar="DIR", help="ID validation images"
        )
        parser.add_argument("--epochs", type=_positive_int, help="fine-tune epochs (default 10)")
        parser.add_argument("--seed", type=int, default=0)
        parser.set_defaults(handler=handler)


def _add_scoring(sub: argparse._SubParsersAction, parents: list) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        parents=parents,
        formatter_class=_Formatter,
        help="AUROC / AUPR / FPR95 of OOD scores on an ID folder against OOD folders",
        description="Score the ID test images and every OOD set; print a table of metrics.",
        epilog="example:\n  oodunleash evaluate unleashed-resnet18 --id-dir data/test "
        "--ood-dir svhn=data/svhn --ood-dir noise=data/noise --fit-dir data/train "
        "--scores energy knn --json results.json\n\n" + EXIT_CODES_HELP,
    )
    evaluate.add_argument("--id-dir", required=True, metavar="DIR", help="ID test images")
    evaluate.add_argument(
        "--ood-dir",
        type=parse_named_dir,
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an OOD set (repeat for several); class sub-folders are optional",
    )
    evaluate.add_argument(
        "--fit-dir", metavar="DIR", help="ID training images for scores that learn (knn, vim, ...)"
    )
    evaluate.add_argument(
        "--scores", nargs="+", metavar="NAME", help="default: the checkpoint's scores, or energy"
    )
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    evaluate.set_defaults(handler=_evaluate.cmd_evaluate)

    score = sub.add_parser(
        "score",
        parents=parents,
        formatter_class=_Formatter,
        help="per-image OOD scores as CSV (path,score; higher = more in-distribution); with "
        "--alpha, in-or-out decisions (path,label,score,p_value,is_ood)",
        epilog="example:\n  oodunleash score unleashed-resnet18 photos/ extra.jpg --score energy "
        "--out scores.csv\n\n" + EXIT_CODES_HELP,
    )
    score.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    score.add_argument("--score", metavar="NAME", help="default: the checkpoint's score")
    score.add_argument("--fit-dir", metavar="DIR", help="ID training images for scores that learn")
    score.add_argument("--out", metavar="CSV", help="write here instead of stdout")
    _add_decision_flags(score)
    score.add_argument("--fdr", action="store_true", help=_FDR_HELP)
    score.set_defaults(handler=_evaluate.cmd_score)

    calibrate = sub.add_parser(
        "calibrate",
        parents=parents,
        formatter_class=_Formatter,
        help="calibrate a checkpoint's score on held-out ID images, for score --alpha",
        description="Score held-out ID images (not used to fit or choose the model or its "
        "score) with the checkpoint's default score and save them in the checkpoint; `score "
        "--alpha A` then flags an image as OOD when its conformal p-value is at most A, which "
        "wrongly flags at most a share A of ID images.",
        epilog="example:\n  oodunleash calibrate unleashed-resnet18 --calib-dir data/calib "
        "--alpha 0.05\n  oodunleash score unleashed-resnet18 photos/ --alpha 0.05\n\n"
        + EXIT_CODES_HELP,
    )
    calibrate.add_argument(
        "--calib-dir", required=True, metavar="DIR", help="held-out ID images (any layout)"
    )
    calibrate.add_argument(
        "--alpha", type=float, metavar="A", help="check there are enough images for this level"
    )
    calibrate.add_argument(
        "--score", metavar="NAME", help="calibrate this score (default: the checkpoint's)"
    )
    calibrate.add_argument(
        "--fit-dir", metavar="DIR", help="ID training images for scores that learn"
    )
    calibrate.add_argument("--out", metavar="DIR", help="checkpoint folder (default: MODEL itself)")
    calibrate.set_defaults(handler=_evaluate.cmd_calibrate)


_FDR_HELP = (
    "with --alpha: flag by Benjamini-Hochberg over all the images scored, so that the expected "
    "share of ID images among the flagged ones is at most A (false-discovery rate), instead of "
    "A of the ID images"
)


def _add_decision_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha",
        type=float,
        metavar="A",
        help="decide in or out: flag images whose conformal p-value is <= A (at most a share A "
        "of ID images flagged); needs a calibrated checkpoint or --calib-dir",
    )
    parser.add_argument(
        "--calib-dir", metavar="DIR", help="held-out ID images to calibrate on first (any layout)"
    )


def _add_hub(sub: argparse._SubParsersAction) -> None:
    push = sub.add_parser(
        "push",
        formatter_class=_Formatter,
        help="upload a checkpoint folder to a Hugging Face Hub model repo",
        epilog="example:\n  oodunleash push unleashed-resnet18 me/resnet18-unleashed --private\n\n"
        + EXIT_CODES_HELP,
    )
    push.add_argument("dir", metavar="DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created when missing)")
    push.add_argument("--commit-message")
    push.add_argument("--token", help="Hub token (default: the logged-in one or HF_TOKEN)")
    push.set_defaults(handler=_push.cmd_push)
    listing = sub.add_parser(
        "list-scores",
        help="the registered OOD scores, what each reads from the model, which need --fit-dir",
    )
    listing.set_defaults(handler=_evaluate.cmd_list_scores)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="Train a small CNN, let tune choose on validation data, compare on test "
        "(no download).",
        description="End-to-end demo of oodunleash.tune on Fashion-MNIST if its files are "
        "found, else on scikit-learn's digits: tune sees validation ID images only, the test "
        "OOD sets are only reported. Under 10 minutes on 2 CPU cores.",
    )
    demo.add_argument("--out", default="oodunleash-demo", help="output directory")
    demo.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    demo.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    demo.add_argument("--device", default="auto", help="torch device (default: cuda if any)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--xi-factor",
        type=float,
        default=3.0,
        help="extra UM and UMAP candidates with ξ = this multiple of the final training loss "
        "(default 3, the library's factor before 0.2; the library's own factor adds none)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_bench.cmd_demo)
    _add_benchmark(sub)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
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
    bench.add_argument("--eval-cap", type=int, help="subsample every val/test set (smoke tests)")
    bench.add_argument(
        "--time-budget",
        type=float,
        help="seconds; fine-tunes that would start later are skipped (the grid is ordered by "
        "priority)",
    )
    bench.add_argument("--quick", action="store_true", help="a tiny fine-tune grid (smoke test)")
    grid_help = "fine-tunes to run instead of the default grid, e.g. um/train_x4/lr0.01/ep10"
    bench.add_argument("--grid", nargs="+", help=grid_help)
    bench.add_argument(
        "--scores",
        nargs="+",
        help="OOD scores to report (default: oodunleash.bench.protocol.ALL_SCORES); any registered "
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
    bench.set_defaults(handler=_bench.cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    """The ``oodunleash`` parser; each sub-command sets ``handler(args) -> exit code``."""
    from oodunleash._version import __version__

    parser = argparse.ArgumentParser(
        prog="oodunleash",
        description="Unleashing Mask (UM / UMAP) for out-of-distribution detection: fine-tune "
        "your classifier on your images, evaluate and score with 18 OOD scores, share it on the "
        "Hugging Face Hub.",
        formatter_class=_Formatter,
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"oodunleash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = _parents()
    with_model = [parents["model"], parents["data"], parents["runtime"]]
    _add_training(sub, with_model)
    _add_scoring(sub, with_model)
    _add_hub(sub)
    _add_bench(sub)
    return parser
