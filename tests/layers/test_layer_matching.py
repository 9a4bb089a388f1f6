"""Layers are matched by what they compute: subclasses with their own forward and name-pattern
matches are checked on their first forward, used when they compute the helper's formula (or a
known variant: channels-first LayerNorm, norm + activation), refused with the reason otherwise."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _layer_cases import BatchNormAct2d, CheckedLinear, DoubledLinear, randomize_norm
from torch import nn

import natgrad
from natgrad.fisher import KFACOperator
from natgrad.fisher.dense import dense_ggn
from natgrad.layers import match

f64 = torch.float64


def _one_step(model, x, y, **kw):
    opt = natgrad.KFAC(model, **{"lr": 0.1, "kl_clip": None, **kw})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, [str(w.message) for w in caught]


def test_match_says_which_modules_are_candidates():
    assert match(nn.Linear(2, 2))[1] is None
    assert match(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))[1] is None
    assert "own forward" in match(DoubledLinear(2, 2))[1]
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    assert match(Conv1D(3, 2))[1] is None  # registered by its qualified name: trusted
    assert "name pattern" in match(LlamaRMSNorm(4))[1]


def test_a_subclass_computing_something_else_is_refused_and_steps_plainly():
    torch.manual_seed(0)
    model = nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    w0 = model[0].weight.detach().clone()
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), model[0].weight)[0]
    opt, messages = _one_step(model, x, y)
    assert any("'0'" in m and "does not compute nn.Linear's" in m for m in messages)
    assert set(opt.layers) == {"2"}
    assert "does not compute" in opt.registration_summary
    assert "0.weight" in opt.curvature.registration.plain
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * grad)  # the plain step


def test_a_subclass_computing_its_parents_formula_is_used():
    torch.manual_seed(1)
    model = nn.Sequential(CheckedLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    opt = natgrad.KFAC(model)
    assert "to be checked on its first forward" in opt.registration_summary
    opt, messages = _one_step(model, x, y)
    assert set(opt.layers) == {"0", "2"} and not messages
    assert "verified (CheckedLinear subclasses Linear" in opt.registration_summary


def test_rmsnorm_name_pattern_gemma_refused_llama_used():
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    for norm, kept in ((LlamaRMSNorm(6), True), (GemmaRMSNorm(6), False)):
        torch.manual_seed(2)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        model = nn.Sequential(nn.Linear(5, 6), norm, nn.Linear(6, 3))
        opt, messages = _one_step(model, x, y)
        assert ("1" in opt.layers) is kept, type(norm).__name__
        assert bool(messages) is not kept
        if kept:
            assert "scale(C=6, 1x1 each)" in opt.registration_summary


@pytest.mark.parametrize("act", ["relu_inplace", "gelu"])
def test_batchnorm_act_train_mode_block_is_the_pre_activation_block(act):
    """One datum in train mode (batch statistics over its positions): the per-channel 2×2
    blocks of the optimizer's capture are the dense Fisher's, i.e. taken at BN(x), not act(·)."""
    torch.manual_seed(3)
    norm = BatchNormAct2d(4, act=nn.ReLU if act == "relu_inplace" else nn.GELU,
                          track_running_stats=False)
    randomize_norm(norm)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    x, y = torch.randn(1, 2, 3, 3, dtype=f64), torch.tensor([1])
    F_ref = dense_ggn(model, x, params=[norm.weight, norm.bias])
    opt, messages = _one_step(model, x, y, fisher="exact")
    assert not messages and "1" in opt.layers
    assert "pre-activation gradient" in opt.registration_summary
    c = torch.arange(4).repeat(2)
    (M,) = opt.factors["1"]
    torch.testing.assert_close(M.to_dense(), F_ref * (c[:, None] == c[None, :]),
                               rtol=1e-10, atol=1e-13)


def test_a_refused_layer_is_left_out_of_the_analysis():
    torch.manual_seed(4)
    model = nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="does not compute"):
        K = KFACOperator.from_data(model, (x, y))
    assert set(K.layers) == {"2"}
    assert K.uncovered == ["0.weight", "0.bias"]


def test_a_checkpoint_with_a_refused_layer_loads_into_a_fresh_optimizer():
    def make():
        torch.manual_seed(5)
        return nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    opt, _ = _one_step(make(), x, y)
    state = opt.state_dict()
    assert list(state["natgrad"]["dropped"]) == ["0"]
    fresh = natgrad.KFAC(make())
    bad = {**state, "natgrad": {**state["natgrad"], "dropped": {"0": 1}}}
    with pytest.raises(ValueError, match="'dropped'"):
        fresh.load_state_dict(bad)
    assert set(fresh.layers) == {"0", "2"}  # a failed load changes nothing
    fresh.load_state_dict(state)
    assert set(fresh.layers) == {"2"}
    assert "does not compute" in fresh.registration_summary
    torch.testing.assert_close(fresh.factors["2"][0].to_dense(), opt.factors["2"][0].to_dense())


def test_a_non_finite_first_forward_decides_nothing():
    from _layer_cases import LayerNorm2d

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), LayerNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
    helper = natgrad.KFAC(model).layers["1"]
    seen = []
    handles = helper.register_hooks(lambda m, i, target: seen.append(target))
    model(torch.full((2, 2, 4, 4), float("nan")))  # W == C: the plain formula is NaN as well
    assert helper.pending is not None and not seen
    model(torch.randn(2, 2, 4, 4))
    assert helper.pending is None and helper.refusal is None and len(seen) == 1
    assert "channels-first" in helper.note
    for h in handles:
        h.remove()


def test_register_layer_by_name_and_pattern():
    from natgrad.layers import LinearHelper, helper_class, register_layer, unregister_layer

    class Affine(nn.Module):  # computes x Wᵀ + b with Linear's attributes
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2))
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x @ self.weight.T + self.bias

    name = f"{Affine.__module__}.{Affine.__qualname__}"
    for bad in ("Affine", "", 3):
        with pytest.raises(ValueError, match="register_layer"):
            register_layer(bad, LinearHelper)
    register_layer(name, LinearHelper)
    try:
        assert helper_class(Affine()) is LinearHelper and match(Affine())[1] is None
    finally:
        unregister_layer(name)
    register_layer("*.Affine", LinearHelper)
    try:
        assert "name pattern '*.Affine'" in match(Affine())[1]
        model = nn.Sequential(Affine(), nn.Tanh(), nn.Linear(3, 2))
        opt, messages = _one_step(model, torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
        assert "0" in opt.layers and not messages
    finally:
        unregister_layer("*.Affine")
    assert helper_class(Affine()) is None


def test_a_candidate_called_with_keywords_only_is_refused():
    class KeywordLinear(nn.Linear):
        def forward(self, *, x):
            return super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = KeywordLinear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x=x)))

    torch.manual_seed(7)
    opt, messages = _one_step(Net(), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert set(opt.layers) == {"b"}
    assert any("without a positional tensor input" in m for m in messages)
