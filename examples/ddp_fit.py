"""Unleash a classifier on several GPUs (or CPU processes) with torchrun / accelerate launch.

The script is an ordinary single-process oodunleash script; nothing in it is specific to DDP
except the rank-0 guard around the outputs. Launch it any of these ways:

    python examples/ddp_fit.py                                   # one process
    torchrun --standalone --nproc_per_node 2 examples/ddp_fit.py # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node 8 examples/ddp_fit.py --model resnet18
    accelerate launch --multi_gpu --num_processes 8 examples/ddp_fit.py --model resnet18

Under a launcher, ``fit`` starts the process group from the environment (NCCL for GPUs, Gloo on
CPU), gives the plain DataLoaders a DistributedSampler (``--batch-size`` is per process), wraps
the model in DistributedDataParallel and averages ξ over every process's data; ``evaluate``
gathers all processes' outputs, so the metrics equal a single-process run on the same data.

The data are synthetic (class-dependent Gaussian images, OOD = unseen classes) so that the script
runs anywhere in seconds; swap in your own ``Dataset`` objects for real use. See
docs/howto/distributed.md.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.runtime.distributed import (
    init_distributed,
    is_main_process,
    local_device,
    world_size,
)


def synthetic_images(n: int, classes: int, size: int, seed: int, ood: bool = False):
    """Noisy images whose mean colour depends on the class; OOD images come from other,
    unseen class means (near-OOD: the same kind of images, different content)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(2 * classes, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    centres = centres[classes:] if ood else centres[:classes]
    images = torch.randn(n, 3, size, size, generator=g) * 1.5 + centres[labels]
    return TensorDataset(images, labels)


def small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["um", "umap"], default="um")
    parser.add_argument("--model", default=None, help="a timm model name (default: a small CNN)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="save the result here (rank 0 only)")
    args = parser.parse_args()

    # Optional: fit() would do it too. Calling it first also pins this process to its GPU
    # (cuda:LOCAL_RANK) before any .cuda(), so no two processes share GPU 0.
    init_distributed()
    device = local_device()  # cuda:LOCAL_RANK, or the CPU when there are too few GPUs

    classes = 5
    train = synthetic_images(1024, classes, 16, seed=1)
    test = synthetic_images(500, classes, 16, seed=2)
    ood = synthetic_images(500, classes, 16, seed=3, ood=True)
    # Plain loaders: oodunleash shards them per process (shuffle is kept).
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=256)
    ood_loader = DataLoader(ood, batch_size=256)

    if args.model is None:
        torch.manual_seed(0)  # the same initial weights everywhere (fit also syncs rank 0's)
        model = small_cnn(classes)
    else:
        import timm

        model = timm.create_model(args.model, pretrained=True, num_classes=classes)
    model.to(device)

    # Stand-in for "a trained classifier": train it with plain cross-entropy first
    # (flooding=False). Skip this with a real trained model.
    OODUnleash(model, method="um").fit(
        train_loader, epochs=args.pretrain_epochs, lr=0.05, flooding=False
    )
    unleashed = OODUnleash(model, method=args.method).fit(train_loader, epochs=args.epochs)
    results = unleashed.evaluate(test_loader, {"unseen": ood_loader}, scores=["energy", "msp"])

    if is_main_process():  # every process holds the same results; one of them reports
        print(f"processes: {world_size()}   ξ = {unleashed.loss_constraint_:.4f}")
        print(json.dumps(results.to_dict(), indent=2))
        if args.out is not None:
            unleashed.save_pretrained(args.out)


if __name__ == "__main__":
    main()
