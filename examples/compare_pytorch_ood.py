"""oodunleash's SCALE, NNGuide, fDBD, NCI and Mahalanobis against pytorch-ood 0.4's, and the
fused scores against the best single score, on one trained small CNN.

Protocol: the benchmark's Fashion-MNIST split (ID classes 0-5, :mod:`oodunleash.bench`), a
small CNN trained from scratch on a seeded subsample of the training split; the penultimate
features and logits of every set are computed once, and both libraries score those same
tensors (pytorch-ood's detectors through their ``fit_features`` / ``predict_features``, its
outlier scores negated so that higher = more ID for both). OOD test sets: near-OOD (test
images of classes 6-9), digits, photo crops, Gaussian and uniform noise, rendered letters.

Reported: per score, the AUROC of each library averaged over the OOD sets, the largest
per-set AUROC difference and the rank correlation of the two libraries' values on all test
samples; Mahalanobis also fitted on only ``--few`` training images (fewer than the 128 feature
dimensions), with the empirical and the Ledoit–Wolf covariance; then test FPR95 and AUROC of
the single scores and of fused scores (members z- or rank-normalised on held-out ID training
data, or on the validation split).

pytorch-ood is not a dependency: install it apart and point ``--ptood`` at it::

    pip install --no-deps --target /tmp/ptood pytorch-ood==0.4.0
    for s in 0 1 2; do OODUNLEASH_FASHION_MNIST=/usr/share/datasets/fashion-mnist PYTHONPATH=. \\
        python examples/compare_pytorch_ood.py --ptood /tmp/ptood --seed $s --train-size 4000 \\
        --epochs 25 --out runs/ptood/s$s.json; done
    python examples/compare_pytorch_ood.py --summarize runs/ptood/s*.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from oodunleash.bench.datasets import GlyphsOOD
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import TensorLoader, load_benchmark_data, train_classifier
from oodunleash.evaluation.metrics import auroc, fpr_at_tpr
from oodunleash.features import FeatureSet, LinearHead
from oodunleash.scores import get_score

#: label -> (our registered name, options); pytorch-ood's counterpart is built in `_theirs`.
COMPARED = {
    "scale": ("scale", {}),
    "nnguide": ("nnguide", {}),
    "fdbd": ("fdbd", {}),
    "nci": ("nci", {}),
    "nci a=0": ("nci", {"alpha": 0.0}),
    "mahalanobis": ("mahalanobis", {"covariance": "empirical"}),
}

#: Single scores and fused scores compared on test.
SINGLES = ["energy", "knn", "mahalanobis", "vim", "react", "scale", "nnguide", "fdbd", "nci"]
FUSED = {
    "fused knn+mahalanobis z": {"members": ["knn", "mahalanobis"], "method": "z"},
    "fused knn+mahalanobis rank": {"members": ["knn", "mahalanobis"], "method": "rank"},
    "fused knn+mahalanobis+energy z": {"members": ["knn", "mahalanobis", "energy"]},
    "fused knn+vim z": {"members": ["knn", "vim"]},
    "fused nnguide+mahalanobis z": {"members": ["nnguide", "mahalanobis"]},
}


@torch.no_grad()
def extract(model: torch.nn.Module, images: torch.Tensor, labels=None) -> FeatureSet:
    """Penultimate features and logits of ``images`` (one pass, batches of 512); both models'
    heads are a linear layer ``fc``."""

    def penultimate(x: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "forward_head"):  # timm: pre-pool maps, then the pooled feature
            return model.forward_head(model.forward_features(x), pre_logits=True)
        return model.forward_features(x)

    feats = torch.cat([penultimate(images[s : s + 512]) for s in range(0, len(images), 512)])
    return FeatureSet(
        logits=model.fc(feats),
        features=feats,
        labels=labels,
        head=LinearHead.from_module(model.fc),
    )


def _theirs(label: str, fc: torch.nn.Module, train: FeatureSet):
    """pytorch-ood's detector for ``label``, fitted; a function features -> ID-ness."""
    from pytorch_ood.detector import NCI, SCALE, Mahalanobis, NNGuide, fDBD

    z, y = train.features, train.labels
    if label == "scale":
        det = SCALE(None, lambda maps: fc(maps.flatten(1)), percentile=0.85)
        return lambda f: -det.predict_feature_maps(f[:, :, None, None])
    if label == "nnguide":
        det = NNGuide(None, fc, k=10).fit_features(z, y)
    elif label == "fdbd":
        det = fDBD(None, fc).fit_features(z)
    elif label.startswith("nci"):
        det = NCI(None, fc, alpha=0.0 if label.endswith("a=0") else 1e-4).fit_features(z)
    else:
        det = Mahalanobis(None).fit_features(z, y)
    return lambda f: -det.predict_features(f)


def _aurocs(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: 100 * auroc(values["id"], v) for k, v in values.items() if k != "id"}


def compare(model, train: FeatureSet, sets: dict[str, FeatureSet], few: int) -> dict[str, Any]:
    """Both libraries on the same features: mean AUROC, max per-set gap, rank correlation."""
    out = {}
    fc = model.fc
    for label, (name, options) in COMPARED.items():
        ours = get_score(name, **options).fit(train)
        theirs = _theirs(label, fc, train)
        a = {k: ours.score(s) for k, s in sets.items()}
        b = {k: theirs(s.features).detach() for k, s in sets.items()}
        ours_auc, theirs_auc = _aurocs(a), _aurocs(b)
        every_a, every_b = torch.cat(list(a.values())), torch.cat(list(b.values()))
        out[label] = {
            "ours": float(np.mean(list(ours_auc.values()))),
            "pytorch-ood": float(np.mean(list(theirs_auc.values()))),
            "max gap": max(abs(ours_auc[k] - theirs_auc[k]) for k in ours_auc),
            "spearman": float(spearmanr(every_a.numpy(), every_b.numpy()).statistic),
        }
    small = train.select(
        torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:few]
    )
    theirs = _theirs("mahalanobis", fc, small)
    rows = {
        "pytorch-ood (inverse, 1e-6 ridge, float32)": {
            k: theirs(s.features) for k, s in sets.items()
        }
    }
    for rule in ("empirical", "ledoit_wolf"):
        score = get_score("mahalanobis", covariance=rule).fit(small)
        rows[f"oodunleash covariance={rule}"] = {k: score.score(s) for k, s in sets.items()}
    out[f"mahalanobis, {few} training images"] = {
        row: {"mean": float(np.mean(list(_aurocs(v).values())))} | _aurocs(v)
        for row, v in rows.items()
    }
    return out


def fusion(train: FeatureSet, val: FeatureSet, sets: dict[str, FeatureSet]) -> dict[str, Any]:
    """Test FPR95 / AUROC per OOD set of single and fused scores."""
    scores = {name: get_score(name) for name in SINGLES}
    for label, config in FUSED.items():
        scores[label] = get_score("fused", **config)
        held_out = get_score("fused", **config).fit(train)
        scores[label + ", val reference"] = held_out.set_reference(
            [m.score(val) for m in held_out.scores]
        )
    out = {}
    for label, score in scores.items():
        if not score.is_fitted:
            score.fit(train)
        values = {k: score.score(s) for k, s in sets.items()}
        per_set = {
            k: {"fpr95": 100 * fpr_at_tpr(values["id"], v), "auroc": 100 * auroc(values["id"], v)}
            for k, v in values.items()
            if k != "id"
        }
        mean = {m: float(np.mean([r[m] for r in per_set.values()])) for m in ("fpr95", "auroc")}
        out[label] = {"mean": mean, **per_set}
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def summarize(runs: list[dict[str, Any]]) -> str:
    """Markdown tables of the runs' means: the two libraries, Mahalanobis on few images, and
    single against fused scores on test."""
    seeds = [r["settings"]["seed"] for r in runs]
    lines = [f"seeds {seeds}, test accuracy {_mean([r['test accuracy'] for r in runs]):.2f}", ""]
    lines += [
        "| score | oodunleash AUROC | pytorch-ood AUROC | largest per-set gap | Spearman (min) |",
        "|---|---|---|---|---|",
    ]
    for label in runs[0]["against pytorch-ood"]:
        rows = [r["against pytorch-ood"][label] for r in runs]
        if "ours" not in rows[0]:
            continue
        lines.append(
            f"| {label} | {_mean([x['ours'] for x in rows]):.2f} | "
            f"{_mean([x['pytorch-ood'] for x in rows]):.2f} | "
            f"{max(x['max gap'] for x in rows):.4f} | {min(x['spearman'] for x in rows):.6f} |"
        )
    few = next(k for k in runs[0]["against pytorch-ood"] if k.startswith("mahalanobis, "))
    sets = [k for k in next(iter(runs[0]["against pytorch-ood"][few].values())) if k != "mean"]
    lines += ["", f"{few}: AUROC", "", f"| covariance | mean | {' | '.join(sets)} |"]
    lines.append("|---" * (len(sets) + 2) + "|")
    for row in runs[0]["against pytorch-ood"][few]:
        cells = [
            _mean([r["against pytorch-ood"][few][row][k] for r in runs]) for k in ["mean", *sets]
        ]
        lines.append(f"| {row} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    sets = [k for k in next(iter(runs[0]["fusion"].values())) if k != "mean"]
    lines += ["", "Test FPR95 (AUROC for the mean)", ""]
    lines += [
        f"| score | mean FPR95 | mean AUROC | {' | '.join(sets)} |",
        "|---" * (len(sets) + 3) + "|",
    ]
    for label in runs[0]["fusion"]:
        mean = [_mean([r["fusion"][label]["mean"][m] for r in runs]) for m in ("fpr95", "auroc")]
        per = [_mean([r["fusion"][label][k]["fpr95"] for r in runs]) for k in sets]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in mean + per) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptood", default="/tmp/ptood", help="where pytorch-ood is installed")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet18"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-cap", type=int, default=1000)
    parser.add_argument("--few", type=int, default=120, help="images for few-sample Mahalanobis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--summarize", nargs="+", type=pathlib.Path, help="result JSONs")
    args = parser.parse_args()
    if args.summarize:
        print(summarize([json.loads(p.read_text()) for p in args.summarize]))
        return
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.ptood)
    torch.manual_seed(args.seed)
    data = load_benchmark_data("fashion-mnist", train_size=args.train_size, eval_cap=args.eval_cap)
    model = create_model(args.model, data["num_classes"])
    loader = TensorLoader(*data["train"], batch_size=128, seed=args.seed)
    train_classifier(model, loader, epochs=args.epochs, device=args.device, progress=False)
    model.cpu().eval()  # the scores run on the CPU, where both libraries see the same tensors
    train = extract(model, *data["train"])
    val = extract(model, *data["val"])
    test_ood = dict(data["test_ood"]) | {"letters": GlyphsOOD(args.eval_cap, seed=0).tensors()[0]}
    sets = {"id": extract(model, *data["test"])} | {
        k: extract(model, v) for k, v in test_ood.items()
    }
    accuracy = float((sets["id"].logits.argmax(1) == sets["id"].labels).float().mean()) * 100
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "test accuracy": accuracy,
        "against pytorch-ood": compare(model, train, sets, args.few),
        "fusion": fusion(train, val, sets),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
