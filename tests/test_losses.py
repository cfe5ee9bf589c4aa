"""The fine-tune's objectives (oodunleash.finetune.losses): the flooding loss |CE − ξ| + ξ and its bound
below chance, OE and Energy-OE."""

from __future__ import annotations

import math

import pytest
import torch

from oodunleash import LossConstraintTooHighError, OODUnleash, flooding_loss
from oodunleash.finetune.loop import energy_oe_loss, oe_loss
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


# ---------------------------------------------------------------- outlier exposure
def test_oe_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    expected = 0.0
    for row in logits.tolist():
        log_z = math.log(sum(math.exp(v) for v in row))
        expected += -sum(v - log_z for v in row) / 3  # CE to the uniform distribution
    assert oe_loss(logits).item() == pytest.approx(expected / 2, rel=1e-6)
    # uniform logits are the minimum: log(C)
    assert oe_loss(torch.zeros(4, 3)).item() == pytest.approx(math.log(3), rel=1e-6)


def test_energy_oe_loss_matches_hand_computation():
    id_logits = torch.tensor([[10.0, 0.0], [30.0, 1.0]])
    out_logits = torch.tensor([[8.0, 8.0], [1.0, 2.0]])

    def energy(row):
        return -math.log(sum(math.exp(v) for v in row))

    in_terms = [max(0.0, energy(r) + 25.0) ** 2 for r in id_logits.tolist()]
    out_terms = [max(0.0, -7.0 - energy(r)) ** 2 for r in out_logits.tolist()]
    expected = sum(in_terms) / 2 + sum(out_terms) / 2
    assert energy_oe_loss(id_logits, out_logits).item() == pytest.approx(expected, rel=1e-5)
    assert energy_oe_loss(id_logits, out_logits, m_in=-5, m_out=-50).item() == pytest.approx(0.0)
