"""The character GPT: shapes, causality, attention against the written-out reference, every
parameter preconditioned by natgrad.KFAC, and it learns Shakespeare with K-FAC."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import dataset_info
from natgrad.data.shakespeare import load_shakespeare_splits
from natgrad.models import GPT, build_model
from natgrad.models.transformer import CausalSelfAttention


def test_default_size_and_shapes():
    torch.manual_seed(0)
    model = build_model("gpt", dataset_info("shakespeare_char"))
    assert sum(p.numel() for p in model.parameters()) >= 400_000
    ids = torch.randint(0, 84, (3, 64))
    assert model(ids).shape == (3, 64, 84)
    assert model(ids[:, :10]).shape == (3, 10, 84)  # shorter inputs are fine
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.int64))


def test_width_depth_heads_are_selectable():
    model = build_model("gpt", dataset_info("shakespeare_char"), hidden=(32, 3, 2))
    assert len(model.blocks) == 3 and model.tok.weight.shape == (84, 32)
    assert model.blocks[0].attn.heads == 2
    with pytest.raises(ValueError, match="width, depth, heads"):
        build_model("gpt", dataset_info("shakespeare_char"), hidden=(32, 2))
    with pytest.raises(ValueError, match="multiple of the heads"):
        GPT(84, 16, width=30, heads=4)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        GPT(84, 16, depth=0)


def test_logits_at_t_do_not_see_later_tokens():
    torch.manual_seed(0)
    model = GPT(20, 12, width=16, depth=2, heads=2).double()
    ids = torch.randint(0, 20, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_matches_the_written_out_reference():
    """SDPA with is_causal equals softmax(QKᵀ/√d_h + causal mask)·V, in float64."""
    torch.manual_seed(0)
    d, heads = 16, 4
    sdpa = GPT(5, 9, width=d, depth=1, heads=heads).blocks[0].attn.double()
    ref = CausalSelfAttention(d, heads).double()
    ref.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 9, d, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x), ref(x))


def test_every_parameter_is_preconditioned():
    torch.manual_seed(0)
    model = build_model("gpt", dataset_info("shakespeare_char"))
    opt = natgrad.KFAC(model)
    covered = {id(p) for h in opt.layers.values() for p in h.params}
    assert all(id(p) in covered for p in model.parameters())
    kinds = {type(m).__name__ for name, m in model.named_modules() if name in opt.layers}
    assert kinds == {"Linear", "Embedding", "LayerNorm"}
    assert "plain step" not in opt.registration_summary


def test_kfac_lowers_the_validation_loss_on_shakespeare():
    torch.manual_seed(0)
    splits = load_shakespeare_splits(context=16)
    model = build_model("gpt", splits["train"].info, hidden=(32, 1, 2))
    opt = natgrad.KFAC(model, lr=0.3, kl_clip=0.1, damping=1e-2)

    def loss_on(x, y):
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    val = splits["validation"]
    with torch.no_grad():
        before = loss_on(val.x[:256], val.y[:256]).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(splits["train"]), (32,), generator=g)
        loss = loss_on(splits["train"].x[idx], splits["train"].y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_on(val.x[:256], val.y[:256]).item()
    assert after < before - 0.5  # from ln 84 ≈ 4.4 towards the unigram entropy (≈ 3.3)
