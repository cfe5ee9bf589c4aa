"""The flooding loss |CE − ξ| + ξ and its bound below chance (oodunleash._losses)."""

from __future__ import annotations

import pytest
import torch

from oodunleash import (
    LossConstraintTooHighError,
    OODUnleash,
    flooding_loss,
)
from tests.helpers.toys import ConvNet, labelled_loader, state_copy


# ---------------------------------------------------------------- flooding
def test_flooding_sign_flips_below_the_constraint():
    for ce_value, expected in [(0.9, 1.0), (0.1, -1.0)]:
        ce = torch.tensor(ce_value, requires_grad=True)
        loss = flooding_loss(ce, 0.5)
        loss.backward()
        assert ce.grad.item() == expected
        assert loss.item() == pytest.approx(abs(ce_value - 0.5) + 0.5)


def test_constraint_at_or_above_chance_is_refused_before_any_step():
    model = ConvNet(3, dropout=0.5)
    before = state_copy(model)
    # Its own class (a ValueError), so that a sweep can catch it and go on.
    with pytest.raises(LossConstraintTooHighError, match=r"not below ln\(3\) = 1\.099.*uniform"):
        OODUnleash(model, constraint=1.2).fit(labelled_loader(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_high_constraint_warns_before_training():
    model = ConvNet(3, dropout=0.5)
    with pytest.warns(UserWarning, match="more than a quarter"):
        OODUnleash(model, constraint=0.5).fit(labelled_loader(), epochs=1, progress=False)
