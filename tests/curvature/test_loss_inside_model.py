"""The loss computed inside the model (``model(ids, labels=ids).loss``, the Hugging Face pattern):
the capture finds the logits in the returned ``ModelOutput``, pulls its directions back when the
user's backward reaches them, and uses the positions the loss uses (transformers' causal-LM loss
shifts the labels: the last position has no target)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.curvature import FISHER_TYPES

transformers = pytest.importorskip("transformers")

V, T, B = 23, 8, 4


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(cfg).double().train()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _shifted_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss written out: position t predicts token t + 1 (the mean over
    the ``B (T - 1)`` terms, computed in float32 as transformers does)."""
    return F.cross_entropy(logits.float()[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _statistics(fisher: str, loss_fn) -> dict:
    model = _gpt2()
    opt = natgrad.KFAC(model, lr=0.01, fisher=fisher, loss_reduction="mean", seed=5)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loss_type.*")
        loss_fn(model, ids).backward()
    return opt._capture.collect()


def _inside(model, ids):
    return model(ids, labels=ids).loss


def _outside(model, ids):
    return _shifted_loss(model(ids).logits, ids)


def _all_positions(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_inside_loss_statistics_equal_the_shifted_loss_outside(fisher):
    inside, outside = _statistics(fisher, _inside), _statistics(fisher, _outside)
    assert inside and set(inside) == set(outside)
    # the empirical rows pass through transformers' float32 loss; mc / exact rows do not
    tol = dict(rtol=1e-5, atol=1e-9) if fisher == "empirical" else dict(rtol=1e-12, atol=1e-14)
    for name, st in outside.items():
        torch.testing.assert_close(inside[name].a, st.a, rtol=0, atol=0)
        torch.testing.assert_close(inside[name].g, st.g, **tol)
        assert inside[name].g_scale == st.g_scale


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_the_position_without_a_target_is_left_out(fisher):
    """The shifted loss leaves the last position without a target: its Monte-Carlo / exact
    directions are not pulled back (the statistics differ from a loss over every position by
    exactly those rows)."""
    shifted, every = _statistics(fisher, _outside), _statistics(fisher, _all_positions)
    # the token embedding's rows are per (sample, position); causal attention: only the last
    # position's (dropped) logits depend on the last position's embedding
    def last(st):  # rows (directions R, sample, position, d) at the last position
        g = st["transformer.wte"].g
        return g.reshape(-1, B, T, g.shape[-1])[:, :, -1]

    assert torch.count_nonzero(last(shifted)) == 0
    assert torch.count_nonzero(last(every)) > 0


def test_training_with_the_inside_loss_collects_curvature_without_warnings():
    model = _gpt2()
    opt = natgrad.KFAC(model, lr=0.01, loss_reduction="mean")
    before = {n: G.to_dense().clone() for n, (_, G) in
              ((n, f) for n, f in opt.factors.items() if len(f) == 2)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loss_type.*")
        warnings.simplefilter("error", RuntimeWarning)
        for seed in range(3):
            ids = _ids(seed)
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    assert opt.steps == 3
    assert all(n == 3 for n in opt.curvature.updates.values()), opt.curvature.updates
    assert before and all(not torch.equal(opt.factors[n][1].to_dense(), G)
                          for n, G in before.items())


def test_empirical_mean_counts_the_terms_the_loss_uses():
    """``loss_reduction="mean"``: the loss divides by the ``B (T - 1)`` positions with a target,
    not by ``B T``; the rows equal those of the summed loss."""
    def mean_loss(model, ids):
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    def sum_loss(model, ids):
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                               reduction="sum")

    def stats(loss_fn, reduction):
        model = _gpt2()
        opt = natgrad.KFAC(model, lr=0.01, fisher="empirical", loss_reduction=reduction)
        loss_fn(model, _ids()).backward()
        return opt._capture.collect()

    mean, total = stats(mean_loss, "mean"), stats(sum_loss, "sum")
    for name, st in total.items():
        torch.testing.assert_close(mean[name].g, st.g, rtol=1e-12, atol=1e-14)
