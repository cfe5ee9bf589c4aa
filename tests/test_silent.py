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
