"""The KL-clip's bookkeeping (natgrad.optim.binding) and the relative clip
(natgrad.optim.relative_clip): no dead knobs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import KFAC
from natgrad.fisher.dense import kron_dense, vec
from natgrad.optim.binding import BindingRecord
from natgrad.optim.relative_clip import RelativeClip


def _model():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_record_counts_and_warns_once_above_threshold():
    rec = BindingRecord("kl_clip", window=4)
    with pytest.warns(RuntimeWarning, match=r"kl_clip=0.001 decided the step size on 75%"):
        for bound in (True, True, False, True):
            rec.record(bound, 2.0, 1e-3)
    assert (rec.steps, rec.bound, rec.fraction, rec.last_quadratic) == (4, 3, 0.75, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            rec.record(True, 2.0, 1e-3)  # said once
    quiet = BindingRecord("kl_clip", window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bound in (True, True, False, False):
            quiet.record(bound)  # exactly half: not "most"
    assert quiet.fraction == 0.5


def test_kfac_says_when_the_clip_decides_every_step():
    torch.manual_seed(0)
    model = _model()
    opt = KFAC(model, lr=1.0, kl_clip=1e-9)
    with pytest.warns(RuntimeWarning, match=r"kl_clip=1e-09 decided the step size on 100% of "
                                            r"the first 50 steps"):
        _train(opt, model, 50)
    d = opt.diagnostics()["kl_clip"]
    assert d["steps"] == d["bound"] == 50 and d["fraction"] == 1.0
    assert "kl_clip bound on 50/50 steps (100%)" in opt.registration_summary


def test_unclipped_kfac_is_silent_and_counts_nothing_bound():
    torch.manual_seed(0)
    model = _model()
    opt = KFAC(model, lr=0.1, kl_clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, model, 50)
    assert opt.diagnostics()["kl_clip"]["bound"] == 0


def test_recorded_quadratic_is_the_dense_one():
    """``q = η² vec(∇)ᵀ (A ⊗ G + λI)⁻¹ vec(∇)`` summed over layers, in float64 (eigh: exact
    damping)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = _model()
        lr, damping = 0.3, 0.05
        opt = KFAC(model, lr=lr, damping=damping, kl_clip=None)
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {id(p): p.grad.clone() for p in model.parameters()}
        opt.step()
        q = 0.0
        for name, helper in opt.layers.items():
            A, G = opt.factors[name]
            V = helper.grad_matrix([grads[id(p)] for p in helper.params])
            K = kron_dense(A.to_dense(), G.to_dense()) + damping * torch.eye(A.dim * G.dim)
            q += lr**2 * float(vec(V) @ torch.linalg.solve(K, vec(V)))
        assert math.isclose(opt.diagnostics()["kl_quadratic_last"], q, rel_tol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_relative_clip_rule():
    clip = RelativeClip(ratio=4.0, decay=0.5)
    assert clip.scale(2.0) == 1.0  # the first step sets the scale
    assert clip.scale(4.0) == 1.0  # 2× the scale: under the ratio
    s = math.exp(0.5 * math.log(2.0) + 0.5 * math.log(4.0))  # running geometric mean
    assert math.isclose(clip.scale(100 * s), math.sqrt(4 / 100))  # a spike is cut to 4·scale
    before = clip.log_scale
    assert clip.scale(float("nan")) == 1.0 and clip.log_scale == before


def test_relative_clip_is_scale_free_so_the_lr_decides():
    """Multiplying every quadratic by c (an lr, a loss convention) leaves every ν unchanged."""
    qs = [1.0, 3.0, 0.5, 40.0, 2.0, 1.5]
    for c in (1e-6, 1.0, 1e4):
        clip = RelativeClip()
        nus = [clip.scale(c * q) for q in qs]
        assert nus[:3] == [1.0, 1.0, 1.0] and nus[3] < 1.0
        if c == 1.0:
            ref = nus
    assert all(math.isclose(a, b) for a, b in zip(nus, ref))


def test_kfac_relative_clip_lr_changes_trajectory_and_checkpoints():
    finals = []
    for lr in (0.05, 0.2):
        torch.manual_seed(2)
        model = _model()
        opt = KFAC(model, lr=lr, kl_clip="relative")
        _train(opt, model, 6)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(finals[0], finals[1])
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = KFAC(twin, lr=0.2, kl_clip=RelativeClip())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.kl_clip.log_scale == opt.kl_clip.log_scale is not None
    assert opt2.diagnostics()["kl_clip"] == opt.diagnostics()["kl_clip"]


@pytest.mark.parametrize("kw, match", [
    ({"kl_clip": "loose"}, "kl_clip='loose'"),
    ({"kl_clip": -1.0}, "kl_clip"),
])
def test_bad_clip_is_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        KFAC(_model(), **kw)


@pytest.mark.parametrize("kw", [{"ratio": 1.0}, {"decay": 1.0}, {"ratio": float("nan")}])
def test_bad_relative_clip_options(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        RelativeClip(**kw)
