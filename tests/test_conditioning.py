"""Conditioning signals: null values, training dropout, batching, refusal of unknown signals, and classifier-free
guidance over any set of signals with a negative condition, against the exact labelled-mixture denoiser."""

from __future__ import annotations

import pytest
import torch

from difflab.conditioning import NULL_LABEL, as_cond, cat_cond, check_cond, drop_signals, null_cond
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance
from difflab.oracles import GaussianMixtureDenoiser

F64 = torch.float64


def test_null_values_per_signal():
    cond = {
        "class_label": torch.tensor([3, 0]),
        "image_embed": torch.randn(2, 4),
        "text_tokens": torch.tensor([[5, 9]] * 2),
    }
    null = null_cond(cond)
    assert null["class_label"].tolist() == [NULL_LABEL, NULL_LABEL] == [-1, -1]
    assert torch.equal(null["image_embed"], torch.zeros(2, 4)) and torch.equal(
        null["text_tokens"], torch.zeros(2, 2).long()
    )
    assert null["text_tokens"].dtype == torch.long


def test_drop_signals_uses_each_signals_own_probability():
    n = 20000
    cond = {"class_label": torch.arange(n) % 7, "image_embed": torch.ones(n, 3)}
    out = drop_signals(cond, {"class_label": 0.3, "image_embed": 0.1}, torch.Generator().manual_seed(0))
    label_share = float((out["class_label"] == NULL_LABEL).double().mean())
    embed_rows = out["image_embed"].abs().sum(1) == 0
    assert abs(label_share - 0.3) < 0.015 and abs(float(embed_rows.double().mean()) - 0.1) < 0.01
    assert bool((out["image_embed"][~embed_rows] == 1).all())  # whole rows are nulled, others kept
    kept = drop_signals(cond, {}, torch.Generator().manual_seed(0))
    assert torch.equal(kept["class_label"], cond["class_label"])


def test_batching_and_refusals():
    a, b = {"class_label": torch.tensor([1])}, {"class_label": torch.tensor([2, 3])}
    assert cat_cond([a, b])["class_label"].tolist() == [1, 2, 3]
    with pytest.raises(DifflabError, match="same signals"):
        cat_cond([a, {"image_embed": torch.zeros(1, 2)}])
    with pytest.raises(DifflabError, match="not trained on image_embed; it takes class_label"):
        check_cond({"image_embed": torch.zeros(1, 2)}, {"class_label"})
    with pytest.raises(DifflabError, match="unknown conditioning signal prompt"):
        as_cond({"prompt": torch.zeros(1)})
    assert as_cond(torch.tensor([4]))["class_label"].tolist() == [4]


def mixture() -> GaussianMixtureDenoiser:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    return GaussianMixtureDenoiser(means, torch.full((3,), 0.7, dtype=F64), torch.full((3,), 1 / 3, dtype=F64))


def test_cfg_with_a_negative_condition_is_the_negative_branch_extrapolated():
    """D = D_neg + w (D_y - D_neg): with the exact conditional denoisers of a labelled mixture."""
    exact = mixture()
    x, sigma = torch.randn(5, 2, dtype=F64), torch.full((5,), 1.3, dtype=F64)
    y, neg = torch.full((5,), 1), torch.full((5,), 2)
    wanted = exact(x, sigma, {"class_label": neg}) + 2.5 * (
        exact(x, sigma, {"class_label": y}) - exact(x, sigma, {"class_label": neg})
    )
    got = ClassifierFreeGuidance(exact, 2.5, negative={"class_label": torch.tensor([2])})(x, sigma, {"class_label": y})
    torch.testing.assert_close(got, wanted)
    plain = ClassifierFreeGuidance(exact, 2.5)(x, sigma, {"class_label": y})
    assert not torch.allclose(plain, got)  # without the negative, the unconditional branch is used
    with pytest.raises(DifflabError, match="holds 2 rows for a batch of 5"):
        ClassifierFreeGuidance(exact, 2.5, negative={"class_label": torch.tensor([2, 2])})(x, sigma, {"class_label": y})


class TwoSignalDenoiser:
    """A denoiser that reports which of two signals were null, to check that CFG nulls all of them at once."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, sigma, cond=None):
        self.seen.append({k: v.clone() for k, v in cond.items()})
        return (
            x * 0 + (cond["class_label"] >= 0).double()[:, None] + 10 * cond["image_embed"].abs().sum(1, keepdim=True)
        )


def test_cfg_drops_every_signal_in_the_unconditional_branch():
    denoiser = TwoSignalDenoiser()
    cond = {"class_label": torch.tensor([1, 2]), "image_embed": torch.ones(2, 3, dtype=F64)}
    x, sigma = torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64)
    out = ClassifierFreeGuidance(denoiser, 3.0)(x, sigma, cond)
    (both,) = denoiser.seen
    assert both["class_label"].tolist() == [1, 2, -1, -1] and both["image_embed"][2:].abs().sum() == 0
    torch.testing.assert_close(out, torch.full((2, 2), 3.0 * 31, dtype=F64))  # D_null = 0, D_y = 31
