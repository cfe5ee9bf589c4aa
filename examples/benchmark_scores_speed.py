"""How much does evaluating many OOD detectors cost compared with one plain inference pass?

``unleashed.evaluate`` runs the model once per data set and every gradient-free detector reads
that pass (logits, penultimate features, feature maps for ASH). This script times, in one run
and on the same data:

1. a plain inference pass (``model(x)`` under ``torch.no_grad``) over the ID and OOD sets;
2. ``evaluate`` with every gradient-free detector (17 of them), metrics included;
3. the same detectors, each evaluated on its own (one forward pass per detector);

and prints the ratios. Detectors are fitted beforehand (one pass over the training images,
timed and reported separately). Timings 1 and 2 are measured back to back ``--repeats`` times;
the ratio is the median of the pairs' ratios, the times the best runs. On CPU the clock is the
process's CPU time (all threads), which other tenants of a shared machine barely disturb;
``--wall`` switches to wall-clock time (always used on CUDA). The load average is printed with
the results.

Run (timm resnet18 at 64 px on random images, ~1-2 minutes on 2 CPU cores)::

    python examples/benchmark_scores_speed.py
    python examples/benchmark_scores_speed.py --threads 1 --images 600   # busy machine
    python examples/benchmark_scores_speed.py --images 2000 --size 96 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash, get_score, list_scores


def loader(n: int, size: int, batch_size: int, seed: int, classes: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


#: On CPU the process's CPU time (all threads): other tenants of a shared machine barely move it,
#: unlike wall time. On CUDA wall time, after synchronising.
CLOCK = {"name": "wall", "fn": time.perf_counter}


def timed(fn) -> float:
    start = CLOCK["fn"]()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return CLOCK["fn"]() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=1000, help="ID test = OOD = train size")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--wall", action="store_true", help="time wall-clock on CPU too")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 gives the steadiest CPU times on a busy machine)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cpu" and not args.wall:
        CLOCK.update(name="CPU", fn=time.process_time)

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes, pretrained=False)
    model = model.to(args.device).eval()
    train = loader(args.images, args.size, args.batch_size, 0, args.classes)
    id_test = loader(args.images, args.size, args.batch_size, 1, args.classes)
    ood = {"ood": loader(args.images, args.size, args.batch_size, 2, args.classes)}
    detectors = [s for s in list_scores() if "gradients" not in get_score(s).requires]

    unleashed = OODUnleash(model)
    fit_s = timed(lambda: unleashed.fit_scores(train, scores=detectors, progress=False))

    @torch.no_grad()
    def plain_pass() -> None:
        for data in (id_test, *ood.values()):
            for images, _ in data:
                model(images.to(args.device))

    def shared() -> None:
        unleashed.evaluate(id_test, ood, scores=detectors, progress=False)

    plain_pass()  # warm-up: allocator, oneDNN/cuDNN kernels
    shared()
    pairs = [(timed(plain_pass), timed(shared)) for _ in range(args.repeats)]
    plain_s, shared_s = min(p for p, _ in pairs), min(s for _, s in pairs)
    ratio = statistics.median(s / p for p, s in pairs)
    separate = {
        name: timed(lambda n=name: unleashed.evaluate(id_test, ood, scores=[n], progress=False))
        for name in detectors
    }
    separate_s = sum(separate.values())

    n_images = args.images * (1 + len(ood))
    print(
        f"{args.model} at {args.size}px on {args.device} ({torch.get_num_threads()} threads), "
        f"{n_images} images to score (ID + OOD), {args.images} to fit; {CLOCK['name']} time"
    )
    print(f"detectors ({len(detectors)}): {', '.join(detectors)}")
    print(f"fit_scores, one pass over the training images:      {fit_s:7.2f} s")
    print(f"plain inference pass, model(x):                      {plain_s:7.2f} s")
    print(f"evaluate, all detectors on one shared pass:          {shared_s:7.2f} s")
    print(f"evaluate, each detector with its own pass:           {separate_s:7.2f} s")
    print(f"ratio shared / plain inference:     {ratio:5.2f}x  (target <= 1.3x)")
    print(f"ratio separate passes / shared:     {separate_s / shared_s:5.2f}x")
    slowest = sorted(separate.items(), key=lambda kv: -kv[1])[:3]
    print("slowest on their own: " + ", ".join(f"{n} {s:.2f} s" for n, s in slowest))
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
