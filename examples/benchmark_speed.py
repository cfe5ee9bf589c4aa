"""Cost of a UM and a UMAP training step relative to a plain PyTorch step (CPU or GPU).

For each model and input size the three sides run interleaved (plain, UM, UMAP, plain, ...) so
that drifts in machine load hit all of them alike; a ratio is the median over repeats of the
library's per-step time over the plain one in the same repeat. The UM/UMAP step time is the library's own epoch time (``history_[0]["time_s"]``) over
the same batches, which excludes one-off set-up (estimating ξ, creating the mask scores) but
includes everything done per step (flooding loss, statistics, the masks' threshold).

It also checks the kept fraction of the training-time masks (sampled threshold) against the
target after several optimizer steps.

    python examples/benchmark_speed.py            # ~3 minutes on 2 idle cores
    python examples/benchmark_speed.py --quick    # ~1 minute
    python examples/benchmark_speed.py --device cuda   # adds 32 px batch-128 and 224 px batch-64 rows

It also times the k-th-value selection behind a mask threshold, ``kthvalue`` against a sort,
on the chosen device (the library sorts on CUDA, where ``kthvalue`` of one long row is slow).
On CUDA the UMAP step is also timed with one sort per layer (the column "UMAP, per-layer
sort"), the way the library selected thresholds before it batched them into one sort.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import timm
import torch
import torch.nn.functional as F

from oodunleash import OODUnleash
from oodunleash.masking import LayerMasks, _kth_smallest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(model, batches, lr=0.01):
    """A textbook PyTorch training loop: the baseline."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
    return (time.perf_counter() - start) / len(batches)


def library_epoch(model, batches, method):
    # A copy: a UMAP fit leaves its mask attached to the model it wrapped.
    unleashed = OODUnleash(copy.deepcopy(model), method=method)
    unleashed.fit(batches, epochs=1, lr=0.01, loss_constraint=0.5, progress=False)
    return unleashed.history_[0]["time_s"] / len(batches)


@contextlib.contextmanager
def per_layer_selection() -> Iterator[None]:
    """Training-time thresholds selected layer by layer (on CUDA the library batches them)."""
    with mock.patch.object(LayerMasks, "_can_batch", lambda self: False):
        yield


def measure(name, size, batch, steps, repeats, device="cpu"):
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
    plain_epoch(model, batches[:1])  # warm-up: allocator, oneDNN primitives
    sides = ["um", "umap"] + (["umap_per_layer"] if torch.device(device).type == "cuda" else [])
    times = {side: [] for side in ["plain", *sides]}
    for _ in range(repeats):
        # Every side on a fresh copy of the same model, so none gains from warm buffers.
        times["plain"].append(plain_epoch(copy.deepcopy(model), batches))
        times["um"].append(library_epoch(model, batches, "um"))
        times["umap"].append(library_epoch(model, batches, "umap"))
        if "umap_per_layer" in times:
            with per_layer_selection():
                times["umap_per_layer"].append(library_epoch(model, batches, "umap"))
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


def kept_fraction_drift(steps: int = 20) -> tuple[float, float]:
    """Largest deviation of the training-time kept fraction from the target over ``steps``
    optimizer steps of UMAP-style score training on resnet18."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps, repeats = (2, 3) if args.quick else (6, 7)
    if device.type == "cuda" and not args.quick:
        # GPU steps are short: more of them, so the first step's one-off work (cuDNN's choice of
        # algorithms, moving the threshold samples to the device) does not pass for per-step cost.
        steps, repeats = 30, 5
    configs = [
        ("resnet18", 224, 8),
        ("resnet18", 64, 32),
        ("vit_tiny_patch16_224", 224, 8),
        ("vit_tiny_patch16_224", 64, 32),
    ]
    if device.type == "cuda":
        # Small images with a large batch, and a batch that keeps the GPU busy.
        configs += [("resnet18", 32, 128), ("resnet18", 224, 64)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    print(
        f"steps per epoch {steps}, repeats {repeats} (interleaved); plain: median s/step; "
        "ratios: median over repeats of (library step / plain step) in the same repeat\n"
    )
    per_layer_column = device.type == "cuda"
    print(
        "| model | px | batch | plain s/step | UM ratio | UMAP ratio | UMAP target |"
        + (" UMAP, per-layer sort |" if per_layer_column else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if per_layer_column else ""))
    for name, size, batch in configs:
        med = measure(name, size, batch, steps, repeats, device)
        target = 1.2 if size >= 224 else 1.5
        print(
            f"| {name} | {size} | {batch} | {med['plain']:.4f} | {med['um']:.3f} "
            f"| {med['umap']:.3f} | <= {target} |"
            + (f" {med['umap_per_layer']:.3f} |" if per_layer_column else ""),
            flush=True,
        )
    print("\n| values | kthvalue s | sort s | kthvalue / sort |")
    print("|---|---|---|---|")
    for n, select_s, sort_s in selection_times(device):
        print(f"| {n} | {select_s:.6f} | {sort_s:.6f} | {select_s / sort_s:.2f} |", flush=True)
    n_steps = 10 if args.quick else 30
    drift, recomputed = kept_fraction_drift(n_steps)
    print(
        f"\nUMAP training-time masks over {n_steps} steps at lr 0.1 (resnet18): largest "
        f"|kept fraction - 0.8| over steps and layers {drift:.4f}; thresholds recomputed in "
        f"{recomputed:.0%} of (step, layer) pairs"
    )


if __name__ == "__main__":
    main()
