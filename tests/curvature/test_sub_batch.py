"""``max_statistics_rows``: a Linear / Conv2d call with more rows (samples × locations) than the
cap gives the statistics of its first ``k = ⌈cap / T⌉`` samples, weighted by ``√(m / k)`` — so
its factors are exactly those of a step on those ``k`` samples, and the other layers' are
untouched (float64, deterministic Fishers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature.hooks import sub_batch
from natgrad.layers import helper_for


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(75, 4)).double()


def _factors(fisher: str, x: torch.Tensor, y: torch.Tensor, cap: int | None):
    model = _cnn()
    opt = natgrad.KFAC(model, lr=0.1, fisher=fisher, max_statistics_rows=cap)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return {name: [f.to_dense() for f in pair] for name, pair in opt.factors.items()}


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_capped_conv_factors_are_those_of_the_first_samples(fisher):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    capped = _factors(fisher, x, y, cap=40)  # conv: 6 × 25 rows > 40 → k = 2; linear: 6 rows
    first = _factors(fisher, x[:2], y[:2], cap=None)
    full = _factors(fisher, x, y, cap=None)
    for got, want in zip(capped["0"], first["0"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for got, want in zip(capped["3"], full["3"]):
        assert torch.equal(got, want)
    assert not torch.allclose(full["0"][0], first["0"][0])  # the cap did change the conv's A


def test_sub_batch_rule():
    conv, norm = helper_for(nn.Conv2d(1, 1, 3))[0], helper_for(nn.LayerNorm(4))[0]
    assert sub_batch(conv, 32, 784, None) is None
    assert sub_batch(conv, 32, 784, 4096) == 6  # ⌈4096 / 784⌉
    assert sub_batch(conv, 32, 10, 4096) is None  # 320 rows
    assert sub_batch(conv, 32, 5000, 4096) == 1
    assert sub_batch(conv, 1, 5000, 4096) is None  # one sample: nothing to drop
    assert sub_batch(norm, 32, 784, 4096) is None  # not rows per sample and location


@pytest.mark.parametrize("cap", [0, -5, 2.5, True])
def test_bad_cap_is_refused_before_any_state(cap):
    model = _cnn()
    with pytest.raises(ValueError, match="max_statistics_rows"):
        natgrad.KFAC(model, max_statistics_rows=cap)
    assert all(not m._forward_hooks for m in model.modules())



def test_capped_resnet_block_factors_are_those_of_the_first_samples():
    """The registry's ResNet-8 (basic blocks with BatchNorm in train mode, so a step on fewer
    samples would change every activation): each capped convolution's ``A`` is the mean of the
    patch outer products of the first ``k`` samples of the very forward the step took."""
    from natgrad.data import dataset_info
    from natgrad.models import build_model, default_dataset

    torch.manual_seed(0)
    info = dataset_info(default_dataset("resnet8"))
    model = build_model("resnet8", info).double()
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, inp, out, name=name: seen.update(
                {name: (inp[0].detach(), out.shape[-2] * out.shape[-1])}))
    opt = natgrad.KFAC(model, lr=0.1, fisher="empirical", max_statistics_rows=1000)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, *info.input_shape, dtype=torch.float64, generator=g)
    F.cross_entropy(model(x), torch.arange(6) % info.num_classes).backward()
    opt.step()
    capped = 0
    for name, (inputs, locations) in seen.items():
        helper, (A, _) = opt.layers[name], opt.factors[name]
        k = sub_batch(helper, 6, locations, 1000) or 6
        rows = helper.input_rows(inputs[:k])
        torch.testing.assert_close(A.to_dense(), rows.T @ rows / k, rtol=1e-12, atol=1e-14)
        capped += k < 6
    assert capped >= 3  # the stem's and the first stage's 28 × 28 convolutions
