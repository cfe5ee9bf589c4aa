"""Cost of the library's training steps and evaluation against plain PyTorch (CPU or GPU).

Measured sides, each a ratio to a plain PyTorch step (SGD, cross-entropy) on the same batches:

- ``UM``: ``OODUnleash(model, method="um")`` with its defaults;
- ``UMAP default``: ``method="umap"`` with its defaults (``mask_mode="model"``, keep 0.9,
  trainable normalisation layers) -- what a user gets;
- ``UMAP layer``: the same with ``mask_mode="layer"`` (one threshold per layer);
- ``UMAP compiled (MODE)`` (``--compile [MODE]``): the default with ``fit(compile=...)``,
  ``torch.compile``'s ``MODE`` (``reduce-overhead`` adds CUDA graphs on GPUs).

For each model and input size the sides run interleaved (plain, UM, UMAP, plain, ...) so that
drifts in machine load hit all of them alike; a ratio is the median over repeats of the
library's per-step time over the plain one in the same repeat. The library's step time is its
own epoch time (``history_[-1]["time_s"]``) over the same batches. Each run has two epochs and
only the second is timed, on both sides: that leaves out one-off set-up (estimating ξ,
creating the mask scores, the first step's allocations) but includes everything done per step
(flooding loss, statistics, the masks' thresholds).

    python examples/benchmark_speed.py                 # CPU rows: resnet18 64 px and 224 px
    python examples/benchmark_speed.py --quick         # the 64 px row only, fewer repeats
    python examples/benchmark_speed.py --device cuda   # adds ResNet-50 / ViT-S rows at batch 64-256

It also times the k-th-value selection behind a mask threshold (``kthvalue`` against a sort)
and the recomputation of every training-time mask after a step in each mask mode, and checks
the kept fraction of the layer-wise training-time masks against the target.

``--eval`` measures evaluation instead: images/s of one pass over an ID and an OOD set (1024
images each on the CPU, 30 batches on CUDA), the library against a plain ``torch.no_grad``
inference loop over the same batches (same batch size, same autocast setting with ``--amp``),
interleaved, median of the per-repeat ratios (``--cpu-time``: CPU time, for a busy machine):

- ``evaluate``: ``OODUnleash(model).evaluate(id_batches, {"ood": ood_batches})`` with its
  default score (fitted beforehand on a third set of the same size when it learns from
  training data, as KNN does), metrics included -- what a user calls (after a first call,
  which resolves how the model is read);
- ``evaluate (energy)``: the same with ``scores="energy"``, which reads the logits alone: the
  library's own cost without the default score's neighbour search;
- ``feature pass``: :func:`oodunleash.features.collect.collect_features` over both sets, keeping logits
  and penultimate features -- the pass every score reads.

    python examples/benchmark_speed.py --eval --threads 1 --cpu-time  # resnet18 64 px, small CNN
    python examples/benchmark_speed.py --eval --device cuda --amp    # adds ResNet-50 / ViT-S rows
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import statistics
import time
from typing import Any

import timm
import torch
import torch.nn.functional as F

from oodunleash import OODUnleash
from oodunleash.bench.models import SmallCNN
from oodunleash.features import collect_features
from oodunleash.masks.layer_masks import LayerMasks

try:
    from oodunleash.masks.ops import _kth_smallest
except ImportError:  # releases before the masking module was split
    from oodunleash.masks.layer_masks import _kth_smallest

#: ``(OODUnleash keyword arguments, fit keyword arguments)`` of each measured side.
SIDES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "UM": ({"method": "um"}, {}),
    "UMAP default": ({"method": "umap"}, {}),
    "UMAP layer": ({"method": "umap", "mask_mode": "layer"}, {}),
}


def compiled_side(mode: str) -> tuple[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The UMAP default under ``fit(training={"compile": ...})`` with ``torch.compile``'s ``mode``
    (``"reduce-overhead"`` adds CUDA graphs)."""
    compile_arg: bool | dict[str, str] = True if mode == "default" else {"mode": mode}
    return f"UMAP compiled ({mode})", ({"method": "umap"}, {"training": {"compile": compile_arg}})


CPU_CONFIGS = [("resnet18", 64, 64), ("resnet18", 224, 16)]
GPU_CONFIGS = [
    ("resnet18", 224, 8),
    ("resnet18", 32, 128),
    ("resnet18", 224, 64),
    ("resnet50", 224, 64),
    ("resnet50", 224, 128),
    ("vit_small_patch16_224", 224, 64),
    ("vit_small_patch16_224", 224, 256),
]

#: ``(model, px, batch)`` rows of ``--eval``; ``small_cnn`` is the demo's 28 px grayscale CNN.
EVAL_CPU_CONFIGS = [
    ("resnet18", 64, 64),
    ("resnet18", 64, 256),
    ("small_cnn", 28, 64),
    ("small_cnn", 28, 256),
]
EVAL_GPU_CONFIGS = [
    *EVAL_CPU_CONFIGS,
    ("resnet50", 224, 64),
    ("resnet50", 224, 256),
    ("vit_small_patch16_224", 224, 64),
    ("vit_small_patch16_224", 224, 256),
]
#: The library's evaluation sides of ``--eval``.
EVAL_SIDES = ("evaluate", "evaluate (energy)", "feature pass")
EVAL_TARGET = 0.95
#: Images per data set of an ``--eval`` row on the CPU: what the library does once per data set
#: (the metrics, setting up the pass) is then spread over as many images at every batch size.
EVAL_IMAGES = 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Epochs per measured run; only the last one is timed. The first step of a run does one-off
#: work on either side (the optimizer's state, oneDNN's choice of kernels for new tensors; for
#: UMAP the mask's buffers), which with the few steps a CPU row affords would pass for per-step
#: cost. ``--epochs 1`` times the first epoch instead.
EPOCHS = 2


def plain_epoch(model, batches, lr=0.01, epochs=EPOCHS):
    """A textbook PyTorch training loop: the baseline. Seconds per step of its last epoch."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()
    device = batches[0][0].device
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        _sync(device)
    return (time.perf_counter() - start) / len(batches)


def library_epoch(model, batches, init_kwargs, fit_kwargs, epochs=EPOCHS):
    """Seconds per step of the last epoch of ``OODUnleash(model, **init_kwargs).fit``, by the
    library's own epoch clock."""
    # A copy: a UMAP fit leaves its mask attached to the model it wrapped.
    unleashed = OODUnleash(copy.deepcopy(model), constraint=0.5, **init_kwargs)
    unleashed.fit(batches, epochs=epochs, progress=False, **fit_kwargs)
    return unleashed.history_[-1]["time_s"] / len(batches)


def measure(name, size, batch, steps, repeats, sides, device="cpu", epochs=EPOCHS):
    kwargs = {"img_size": size} if "vit" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).to(device)
    batches = [
        (
            torch.randn(batch, 3, size, size, device=device),
            torch.randint(0, 10, (batch,), device=device),
        )
        for _ in range(steps)
    ]
    plain_epoch(copy.deepcopy(model), batches[:1], epochs=1)  # warm-up: allocator, oneDNN
    times: dict[str, list[float]] = {side: [] for side in ["plain", *sides]}
    for _ in range(repeats):
        # Every side on a fresh copy of the same model, so none gains from warm buffers.
        times["plain"].append(plain_epoch(copy.deepcopy(model), batches, epochs=epochs))
        for side, (init_kwargs, fit_kwargs) in sides.items():
            times[side].append(library_epoch(model, batches, init_kwargs, fit_kwargs, epochs))
    # Ratios paired within a repeat cancel slow drifts in machine load; then the median.
    ratios = {
        side: statistics.median(s / p for s, p in zip(times[side], times["plain"], strict=True))
        for side in sides
    }
    return {"plain": statistics.median(times["plain"]), **ratios}


def selection_times(device: torch.device, repeats: int = 20) -> list[tuple[int, float, float]]:
    """Median seconds of one k-th-value selection by ``kthvalue`` and by a sort, for the
    sampled threshold (131,072 scores) and for the largest resnet18 layer (2.4M weights)."""
    rows = []
    for n in (131072, 2359296):
        values = torch.rand(n, device=device)
        k = n - round(0.8 * n) + 1
        times = {}
        for by_sort in (False, True):
            _kth_smallest(values, k, by_sort=by_sort)  # warm-up
            runs = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                _kth_smallest(values, k, by_sort=by_sort)
                _sync(device)
                runs.append(time.perf_counter() - start)
            times[by_sort] = statistics.median(runs)
        rows.append((n, times[False], times[True]))
    return rows


def mask_update_times(repeats: int = 15) -> dict[str, float]:
    """Median seconds to recompute every training-time mask of resnet18 after an optimizer
    step, per mask mode at the default keep ratio: the part of a UMAP step that grows with
    the number of weights, not with the batch."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    times = {}
    for mode in ("model", "layer"):
        masks = LayerMasks(model, keep_ratio=0.9, mode=mode)
        runs = []
        for _ in range(repeats + 1):  # the first run allocates buffers: not timed
            with torch.no_grad():
                for scores in masks.scores.values():  # a small update, as a step makes
                    scores.add_(torch.randn_like(scores), alpha=1e-3 * float(scores.std()))
            start = time.perf_counter()
            for name in masks.layer_names:
                masks._dropped(name, exact=False)
            runs.append(time.perf_counter() - start)
        times[mode] = statistics.median(runs[1:])
    return times


def kept_fraction_drift(steps: int = 20) -> tuple[float, float]:
    """Largest deviation of the training-time kept fraction from the target over ``steps``
    optimizer steps of UMAP-style score training on resnet18 (layer-wise mode)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    masks = LayerMasks(model, keep_ratio=0.8).attach()
    optimizer = torch.optim.SGD(masks.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.requires_grad_(False)
    worst = 0.0
    model.train()
    updates_before = masks.threshold_updates
    for _ in range(steps):
        x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for frac in masks.kept_fraction(exact=False).values():
            worst = max(worst, abs(frac - 0.8))
    recomputed = (masks.threshold_updates - updates_before) / (steps * len(masks.layer_names))
    masks.detach()
    return worst, recomputed


def train_table(configs, sides, device, steps, repeats, epochs=EPOCHS) -> None:
    """Print the training-step table: each side's step time over a plain step's."""
    print(
        f"steps per epoch {steps}, epoch {epochs} of {epochs} timed, repeats {repeats} "
        "(interleaved); plain: median s/step; ratios: median over repeats of (library step / "
        "plain step) in the same repeat\n"
    )
    print("| model | px | batch | plain s/step | " + " | ".join(sides) + " | UMAP target |")
    print("|---|---|---|---|" + "---|" * len(sides) + "---|")
    for name, size, batch in configs:
        # Fewer steps at 224 px on CPU, where one step takes seconds.
        n_steps = max(2, steps // 2) if size >= 224 and device.type == "cpu" else steps
        med = measure(name, size, batch, n_steps, repeats, sides, device, epochs)
        target = 1.2 if size >= 224 or device.type == "cuda" else 1.5
        ratios = " | ".join(f"{med[side]:.2f}" for side in sides)
        print(
            f"| {name} | {size} | {batch} | {med['plain']:.4f} | {ratios} | <= {target} |",
            flush=True,
        )


# --------------------------------------------------------------------------- evaluation
def _eval_model(name: str, size: int, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The model of an ``--eval`` row, in eval mode, and its input channels."""
    torch.manual_seed(0)
    if name == "small_cnn":
        model, chans = SmallCNN(num_classes=10, in_chans=1), 1
    else:
        kwargs = {"img_size": size} if "vit" in name else {}
        model, chans = timm.create_model(name, pretrained=False, num_classes=10, **kwargs), 3
    return model.to(device).eval(), chans


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    # The training step's choice: float16 on CUDA, bfloat16 elsewhere.
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


def _timed(run, device: torch.device, amp: bool, clock=time.perf_counter) -> float:
    """Seconds of ``run()`` under the autocast setting, the device synchronised at both ends."""
    _sync(device)
    start = clock()
    with _autocast(device, amp):
        run()
    _sync(device)
    return clock() - start


def plain_inference(model, datasets) -> None:
    """The baseline: a textbook inference loop over each data set."""
    with torch.no_grad():
        for batches in datasets:
            for x, _ in batches:
                model(x)


def measure_eval(name, size, batch, steps, repeats, device, amp=False, clock=time.perf_counter):
    """Median images/s of the plain loop, and each side of :data:`EVAL_SIDES`'s ratios
    (library images/s over plain images/s in the same repeat), one per repeat; timed by
    ``clock`` (``time.process_time`` counts this process's CPU time, not the wall clock)."""
    model, chans = _eval_model(name, size, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def batches(shift: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.randn(batch, chans, size, size, device=device, generator=gen) + shift,
                torch.randint(0, 10, (batch,), device=device, generator=gen),
            )
            for _ in range(steps)
        ]

    train_set, id_set, ood_set = batches(0.0), batches(0.0), batches(1.0)
    unleashed = OODUnleash(model)
    # The default score, fitted once when it learns from training data (KNN does), as a user
    # fits it once and evaluates many times.
    unleashed.fit_scores(train_set, [unleashed.default_score], progress=False)
    sides = {
        "plain": lambda: plain_inference(model, (id_set, ood_set)),
        "evaluate": lambda: unleashed.evaluate(id_set, {"ood": ood_set}, progress=False),
        # Energy reads the logits alone: what the library adds, without KNN's search.
        "evaluate (energy)": lambda: unleashed.evaluate(
            id_set, {"ood": ood_set}, scores="energy", progress=False
        ),
        "feature pass": lambda: [
            collect_features(unleashed.feature_extractor, data, keep=("logits", "features"))
            for data in (id_set, ood_set)
        ],
    }
    for run in sides.values():  # warm-up; the first evaluate resolves how the model is read
        _timed(run, device, amp)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, run in sides.items():
            times[side].append(_timed(run, device, amp, clock))
    images = 2 * steps * batch
    ratios = {
        # A throughput ratio: plain time over library time in the same repeat.
        side: [p / s for s, p in zip(times[side], times["plain"], strict=True)]
        for side in EVAL_SIDES
    }
    return {"plain": images / statistics.median(times["plain"]), **ratios}


def _ratio_cell(ratios: list[float]) -> str:
    """The median ratio, whether it meets the target, and the range over the repeats."""
    median = statistics.median(ratios)
    missed = "" if median >= EVAL_TARGET else " missed"
    return f"{median:.3f}{missed} ({min(ratios):.2f}-{max(ratios):.2f})"


def eval_table(configs, device, steps=None, repeats=5, amp=False, cpu_time=False) -> None:
    """Print the ``--eval`` table of ``configs`` (``(model, px, batch)`` rows). ``steps``:
    batches per data set, by default :data:`EVAL_IMAGES` images' worth (30 batches on CUDA);
    ``cpu_time`` times by this process's CPU time (a machine shared with other jobs), not the
    wall clock."""
    clock = time.process_time if cpu_time else time.perf_counter
    score = inspect.signature(OODUnleash).parameters["score"].default
    print(
        f"evaluation of an ID and an OOD set (evaluate: default score {score!r}), "
        f"repeats {repeats} (interleaved), autocast "
        f"{'on' if amp else 'off'}, {'process CPU time' if cpu_time else 'wall clock'}; plain: "
        "median images/s of a torch.no_grad loop; ratios: median over repeats of (library "
        "images/s / plain images/s) in the same repeat, and their range\n"
    )
    head = "| model | px | batch | batches per set | plain images/s | "
    print(head + " | ".join(EVAL_SIDES) + " | target |")
    print("|---|---|---|---|---|" + "---|" * len(EVAL_SIDES) + "---|")
    for name, size, batch in configs:
        n = steps or (30 if device.type == "cuda" else max(2, EVAL_IMAGES // batch))
        med = measure_eval(name, size, batch, n, repeats, device, amp, clock)
        cells = " | ".join(_ratio_cell(med[side]) for side in EVAL_SIDES)
        print(
            f"| {name} | {size} | {batch} | {n} | {med['plain']:.0f} | {cells} | "
            f">= {EVAL_TARGET} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px row only, fewer repeats")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--steps", type=int, help="batches per epoch (8; 30 on CUDA) or data set (--eval)"
    )
    parser.add_argument(
        "--repeats", type=int, help="interleaved repeats (3; 7 with --eval; 5 on CUDA)"
    )
    parser.add_argument("--size", type=int, help="only the rows at this input size (px)")
    parser.add_argument("--batch", type=int, help="only the rows at this batch size")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help="epochs per run; the last one is timed"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="add a fit(compile=...) side; MODE: torch.compile's mode, e.g. reduce-overhead",
    )
    parser.add_argument("--model", help="only the rows of this model, e.g. resnet50")
    parser.add_argument("--no-extras", action="store_true", help="skip the selection tables")
    parser.add_argument("--eval", action="store_true", help="evaluation throughput instead")
    parser.add_argument("--amp", action="store_true", help="--eval under autocast (bf16/fp16)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="--eval timed by process CPU time (busy machine)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time counts CPU time: it measures nothing of a GPU's work.")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    # GPU steps are short: more of them, so the first step's one-off work (cuDNN's choice of
    # algorithms, moving the threshold samples to the device) does not pass for per-step cost.
    cuda = device.type == "cuda"
    steps, repeats = (30, 5) if cuda else (8, 3)
    repeats = args.repeats or (7 if args.eval and not cuda else repeats)
    if args.eval:
        configs = EVAL_GPU_CONFIGS if cuda else EVAL_CPU_CONFIGS
    else:
        configs = GPU_CONFIGS if cuda else CPU_CONFIGS
    if args.quick:
        configs = configs[:1]
    if args.size:
        configs = [c for c in configs if c[1] == args.size]
    if args.batch:
        configs = [c for c in configs if c[2] == args.batch]
    if args.model:
        configs = [c for c in configs if c[0] == args.model]
    if args.eval:
        eval_table(configs, device, args.steps, repeats, args.amp, args.cpu_time)
        return
    sides = dict(SIDES)
    if args.compile:
        name, side = compiled_side(args.compile)
        sides[name] = side
    train_table(configs, sides, device, args.steps or steps, repeats, args.epochs)
    if args.no_extras:
        return
    print("\n| values | kthvalue s | sort s | kthvalue / sort |")
    print("|---|---|---|---|")
    for n, select_s, sort_s in selection_times(device):
        print(f"| {n} | {select_s:.6f} | {sort_s:.6f} | {select_s / sort_s:.2f} |", flush=True)
    updates = mask_update_times()
    print(
        "\nresnet18, keep 0.9: every training-time mask recomputed after a small score update, "
        + ", ".join(f"mask_mode={mode!r} {s * 1000:.1f} ms" for mode, s in updates.items())
    )
    n_steps = 10 if args.quick else 30
    drift, recomputed = kept_fraction_drift(n_steps)
    print(
        f"\nUMAP layer-wise training-time masks over {n_steps} steps at lr 0.1 (resnet18): "
        f"largest |kept fraction - 0.8| over steps and layers {drift:.4f}; thresholds "
        f"recomputed in {recomputed:.0%} of (step, layer) pairs"
    )


if __name__ == "__main__":
    main()
