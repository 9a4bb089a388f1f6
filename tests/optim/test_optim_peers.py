"""The optimizers natgrad is raced against: each builds from the registry and trains the GPT;
Muon + AdamW splits the parameters by role and acts as one optimizer."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from natgrad._optional import MissingExtraError
from natgrad.data import dataset_info
from natgrad.models import build_model
from natgrad.optim import OPTIMIZERS, make_optimizer
from natgrad.optim.peers import MuonWithAdamW, hidden_matrices

PEERS = ["adamw", "muon", "soap", "shampoo", "kron"]


def _gpt(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("gpt", dataset_info("shakespeare_char"), hidden=(32, 2, 2))


def _loss(model, x):
    out = model(x[:, :-1])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))


def _train(model, opt, steps: int) -> list[float]:
    x = torch.randint(0, 84, (8, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = _loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_builds_and_lowers_the_loss_of_the_gpt(name):
    model = _gpt()
    opt = make_optimizer(name, model)
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[name].default_lr
    losses = _train(model, opt, 12)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_muon_takes_the_hidden_matrices_adamw_the_rest():
    model = _gpt()
    hidden, rest = hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        f"blocks.{b}.{m}.weight" for b in (0, 1)
        for m in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.0", "mlp.2"))
    assert {"tok.weight", "pos.weight", "head.weight", "head.bias", "norm.weight"} <= {
        names[id(p)] for p in rest}
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    opt = make_optimizer("muon", model, lr=0.05, adamw_lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)


def test_muon_with_adamw_is_one_optimizer():
    model = _gpt()
    opt = make_optimizer("muon", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.5e-4]  # both parts scheduled
    _train(model, opt, 2)
    sched.step()
    saved = opt.state_dict()
    twin_model = _gpt()
    twin_model.load_state_dict(model.state_dict())
    twin = make_optimizer("muon", twin_model)
    twin.load_state_dict(copy.deepcopy(saved))  # as from a file: no shared buffers
    a, b = _train(model, opt, 3), _train(twin_model, twin, 3)
    assert a == b  # a checkpoint round-trips exactly
    with pytest.raises(ValueError, match="'muon' and 'adamw'"):
        twin.load_state_dict({"muon": saved["muon"]})


def test_muon_needs_hidden_matrices():
    with pytest.raises(ValueError, match="no hidden nn.Linear matrix"):
        MuonWithAdamW(torch.nn.Sequential(torch.nn.Linear(3, 2)))


def test_pytorch_optimizer_is_an_extra(monkeypatch):
    for key in [k for k in sys.modules if k.split(".")[0] == "pytorch_optimizer"]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'natgrad\[peers\]'"):
        make_optimizer("soap", _gpt())


def test_float32_newton_schulz_is_torchs_iteration_in_float32():
    """The float32 orthogonalisation agrees with torch's bfloat16 one to bfloat16's rounding,
    for wide and tall matrices, and the registry's CPU Muon uses it only during its step."""
    import torch.optim._muon as muon_module

    from natgrad.optim.peers import newton_schulz_float32

    g = torch.Generator().manual_seed(0)
    for shape in ((6, 10), (10, 6)):
        G = torch.randn(*shape, generator=g)
        args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
        ours, ref = newton_schulz_float32(G, *args), muon_module._zeropower_via_newtonschulz(
            G, *args).float()
        assert ours.dtype == torch.float32 and ours.shape == G.shape
        torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05)
    model = _gpt()
    opt = make_optimizer("muon", model)
    assert opt.newton_schulz_float32  # the model is on the CPU
    saved = muon_module._zeropower_via_newtonschulz
    _train(model, opt, 1)
    assert muon_module._zeropower_via_newtonschulz is saved  # restored after the step
    with pytest.raises(ValueError, match="newton_schulz_float32"):
        MuonWithAdamW(model, newton_schulz_float32=1)


def test_eigen_adam_entries_train_the_gpt():
    for name in ("eigenadam", "peigenadam"):
        model = _gpt()
        opt = make_optimizer(name, model)
        assert opt.eigen_adam is not None and opt.param_groups[0]["weight_decay"] == 0.01
        losses = _train(model, opt, 12)
        assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
