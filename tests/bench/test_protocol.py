"""The benchmark's protocol (oodunleash.bench.protocol): label noise, scoring, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import (
    TensorLoader,
    evaluate_model,
    load_benchmark_data,
    noisy_labels,
    train_classifier,
)


def test_label_noise_flips_to_another_class_at_the_rate():
    labels = torch.arange(20_000) % 6
    assert torch.equal(noisy_labels(labels, 0.0, 6, seed=0), labels)
    noisy = noisy_labels(labels, 0.2, 6, seed=0)
    flipped = noisy != labels
    assert 0.18 < flipped.float().mean() < 0.22
    assert noisy.min() >= 0 and noisy.max() <= 5
    # Same seed, same noise; another seed, other flips.
    assert torch.equal(noisy, noisy_labels(labels, 0.2, 6, seed=0))
    assert not torch.equal(noisy, noisy_labels(labels, 0.2, 6, seed=1))


def test_evaluate_model_fits_every_score_that_learns_from_id_data():
    torch.manual_seed(0)
    data = load_benchmark_data("digits", eval_cap=200)
    model = create_model("small_cnn", data["num_classes"])
    ood = {"noise": data["test_ood"]["gaussian"]}
    # DICE and ReAct learn from ID training data, as Mahalanobis and KNN do.
    with pytest.raises(ValueError, match=r"\['react', 'dice'\] learn from ID training data"):
        evaluate_model(model, data["test"], ood, ("energy", "react", "dice"))
    fit_set = (data["train"][0][:300], data["train"][1][:300])
    k = data["num_classes"]
    out = evaluate_model(
        model, data["test"], ood, ("react", "dice"), fit_set=fit_set, num_classes=k
    )
    assert set(out["metrics"]) == {"react", "dice"}
    assert 0 <= out["metrics"]["dice"]["noise"]["fpr95"] <= 100
    # Mahalanobis keeps a mean per class: a fit set missing a class is refused.
    one_class = fit_set[1] == fit_set[1][0]
    with pytest.raises(ValueError, match="fit_set has no image of class"):
        evaluate_model(
            model,
            data["test"],
            ood,
            ("mahalanobis",),
            fit_set=(fit_set[0][one_class], fit_set[1][one_class]),
            num_classes=k,
        )


def test_train_classifier_uses_the_library_loop_and_calls_back_after_each_epoch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    seen = []

    def on_epoch(epoch):
        # Called when the epoch's last step is done: the weights are that epoch's.
        seen.append((epoch, net[1].weight.detach().clone()))
        return {"probe": epoch}

    history = train_classifier(
        net, TensorLoader(x, y, 16, seed=0), epochs=2, lr=0.1, on_epoch=on_epoch, progress=False
    )
    assert [h["epoch"] for h in history] == [1, 2] and [h["probe"] for h in history] == [1, 2]
    assert all(0 <= h["accuracy"] <= 100 and h["loss"] > 0 for h in history)
    assert [e for e, _ in seen] == [1, 2] and not torch.equal(seen[0][1], seen[1][1])
    assert torch.equal(seen[1][1], net[1].weight)
