"""The zoo itself: every entry builds with the pattern it claims, batches have the documented
shapes, and the transformers builders name the extra when transformers is missing."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from _zoo_cases import CASES, batch, build, logits
from torch import nn

from natgrad._optional import MissingExtraError
from natgrad.models.zoo import ZOO, build_zoo_model
from natgrad.models.zoo.blocks import BatchNormAct2d, LayerNorm2d


def test_the_case_table_covers_the_zoo():
    assert [c.name for c in CASES] == list(ZOO)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shapes(case):
    model = build(case)
    x, y = batch(case, 3)
    out = logits(model(x))
    spec = case.spec
    if spec.output == "sequence":
        assert out.shape == (3, 8, spec.num_classes) and y.shape == (3, 8)
        assert torch.equal(x, y)
    else:
        assert out.shape == (3, spec.num_classes) and y.shape == (3,)
        assert int(y.max()) < spec.num_classes
    assert x.dtype == (torch.float32 if spec.inputs == "image" else torch.int64)


def test_layernorm2d_normalises_the_channels():
    torch.manual_seed(0)
    ln = LayerNorm2d(4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 3, 5)  # W != C: the parent's forward would refuse it
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mu) / (var + ln.eps).sqrt() * ln.weight[:, None, None] \
        + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), expected)
    assert isinstance(ln, nn.LayerNorm) and type(ln).forward is not nn.LayerNorm.forward


@pytest.mark.parametrize("act", [nn.ReLU, nn.Hardswish, None])
def test_batchnorm_act_is_act_of_batchnorm(act):
    torch.manual_seed(1)
    m = BatchNormAct2d(3, act).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 4)
    bn = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    expected = bn if act is None else act()(bn)
    torch.testing.assert_close(m(x), expected)
    assert isinstance(m, nn.BatchNorm2d)


def test_the_patterns_are_there():
    mods = {name: build(next(c for c in CASES if c.name == name)) for name in
            ("mobilenet_like", "convnext_like", "resnet_inplace")}
    convs = [m for m in mods["mobilenet_like"].modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
    assert any(isinstance(m, BatchNormAct2d) for m in mods["mobilenet_like"].modules())
    assert sum(isinstance(m, LayerNorm2d) for m in mods["convnext_like"].modules()) == 2
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in mods["resnet_inplace"].modules())


def test_transformers_patterns():
    pytest.importorskip("transformers")
    gpt2, llama = build_zoo_model("gpt2"), build_zoo_model("llama")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert gpt2.config._attn_implementation == "sdpa"  # the library's default
    assert any(type(m).__name__ == "LlamaRMSNorm" for m in llama.modules())
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    eager = build_zoo_model("bert", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_unknown_name_and_missing_transformers(monkeypatch):
    with pytest.raises(ValueError, match="unknown zoo model 'resnet50'; accepted: mobilenet_like"):
        build_zoo_model("resnet50")
    for key in [k for k in sys.modules if k == "transformers" or k.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'natgrad\[zoo\]'"):
        build_zoo_model("gpt2")
    assert isinstance(build_zoo_model("vit_like"), nn.Module)  # torch-only models still build
