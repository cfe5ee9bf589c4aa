"""Cases that used to give a wrong answer without a word: concurrent scoring, the caller's
random state, proxy outliers from bad images."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from oodunleash import OODUnleash


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(  # left in train mode, as built: score() must not change that
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip


@pytest.mark.parametrize("score", ["vim", "knn"])
def test_concurrent_scores_on_a_model_in_train_mode(score):
    """Two threads scoring at once: one leaving score() must not put the model back in train
    mode while the other is mid-forward (BatchNorm would read batch statistics and move its
    running averages)."""
    net = _bn_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    unleashed = OODUnleash(net).fit_scores(
        [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)], ["vim", "knn"], progress=False
    )
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(16, 1, 8, 8, generator=g), 3 * torch.randn(16, 1, 8, 8, generator=g)]
    expected = [unleashed.score(b, score) for b in batches]
    wrong, errors, start = [0, 0], [], threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(200):
                wrong[i] += not torch.equal(unleashed.score(batches[i], score), expected[i])
        except Exception as err:  # a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == [0, 0]
    assert all(m.training for m in net.modules())  # the user's mode came back
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize(("method", "score"), [("um", "knn"), ("umap", "vim"), ("um", "energy")])
def test_fit_leaves_the_callers_random_state_alone(method, score):
    from torch.utils.data import DataLoader

    from tests.helpers.fits import dataset, make_net

    data = DataLoader(dataset(), batch_size=16, shuffle=True)
    unleashed = OODUnleash(make_net(), method, constraint=0.3, score=score)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    unleashed.fit(data, epochs=1, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_proxy_ood_refuses_nan_pixels():
    from torch.utils.data import DataLoader, TensorDataset

    from oodunleash.evaluation.proxy import proxy_ood

    images = torch.rand(16, 1, 8, 8)
    images[3, 0, 2, 2] = float("nan")
    kept = images.clone()
    val = DataLoader(TensorDataset(images, torch.zeros(16).long()), batch_size=8)
    with pytest.raises(ValueError, match=r"1 of 16 .*NaN or infinite.*\[3\].*drop those images"):
        proxy_ood(val, n=16)
    assert torch.equal(images.isnan(), kept.isnan())
    assert torch.equal(images.nan_to_num(), kept.nan_to_num())


@pytest.mark.parametrize("side", [1, 2, 3])
def test_jigsaw_on_tiny_images_differs_or_is_refused(side):
    from oodunleash.evaluation.proxy import proxy_images

    images = torch.randn(16, 1, side, side, generator=torch.Generator().manual_seed(0))
    kept = images.clone()
    if side == 1:
        with pytest.raises(ValueError, match="'jigsaw'.*1x1.*Leave 'jigsaw' out"):
            proxy_images(images, ["jigsaw"])
        assert "jigsaw" not in proxy_images(images)  # the default leaves it out
    else:
        shuffled = proxy_images(images, ["jigsaw"])["jigsaw"]
        assert all(not torch.equal(a, b) for a, b in zip(shuffled, images, strict=True))
    assert torch.equal(images, kept)
