"""natgrad.KFAC off the MNIST path: sequence outputs, mixed precision, accumulation, structured
outputs, subclasses, checkpoints, low precision, validation. Each case was a silent failure or a
crash before; each is now checked against a dense float64 reference or a clear error."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import natgrad
from natgrad.curvature import FISHER_TYPES
from natgrad.likelihoods import get_likelihood

f64 = torch.float64


# ---------------------------------------------------------------- 1. sequence logits (B, T, V)
class CausalToy(nn.Module):
    """Embedding → Linear on (B, T, d) → tanh → causal running mean → vocabulary head."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, vocab)

    def mix(self, s: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(s).cumsum(-2)  # position t sees positions <= t
        steps = torch.arange(1, s.shape[-2] + 1, dtype=s.dtype).unsqueeze(-1)
        return self.head(h / steps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.lin(self.emb(ids)))


def _tokens(B: int = 3, T: int = 4, vocab: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (B, T), generator=g),
            torch.randint(0, vocab, (B, T), generator=g))


def _one_step(model, ids, y, **kw) -> natgrad.KFAC:
    opt = natgrad.KFAC(model, lr=0.1, kl_clip=None, **kw)
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


def _reference_G(model: CausalToy, ids, y, fisher: str) -> torch.Tensor:
    """G of ``model.lin`` by brute force: per sample the Jacobian of the logits (T, V) with
    respect to the layer output (T, d_G), contracted with the output rows of the Fisher kind."""
    B, T = ids.shape
    s = model.lin(model.emb(ids)).detach()
    ce = get_likelihood("cross_entropy")
    G = 0
    for n in range(B):
        J = jacrev(model.mix)(s[n])  # (T, V, T, d_G)
        f = model.mix(s[n]).detach()  # (T, V)
        if fisher == "exact":
            Bn = ce.event_hessian_sqrt(f)  # (T, R, V): each position's rows alone
            rows = torch.einsum("trv,tvsd->trsd", Bn, J).reshape(-1, T, J.shape[-1])
        else:  # empirical: the gradient of the sequence's summed NLL
            r = ce.nll_grad(f[None], y[n][None])[0]  # (T, V)
            rows = torch.einsum("tv,tvsd->sd", r, J)[None]
        G = G + torch.einsum("ksd,kse->de", rows, rows)
    return G / (B * T)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_sequence_logits_statistics_equal_dense_reference(fisher):
    torch.manual_seed(0)
    model = CausalToy().double()
    ids, y = _tokens()
    ref_model = copy.deepcopy(model)
    kw = {"loss_reduction": "mean"} if fisher == "empirical" else {}
    opt = _one_step(model, ids, y, fisher=fisher, **kw)
    A, G = opt.factors["lin"]
    e = torch.cat([ref_model.emb(ids).detach(), torch.ones(*ids.shape, 1, dtype=f64)], -1)
    A_ref = torch.einsum("btd,bte->de", e, e) / ids.shape[0]  # per sequence: sum over positions
    torch.testing.assert_close(A.to_dense(), A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.to_dense(), _reference_G(ref_model, ids, y, fisher),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_sequence_logits_train_for_every_fisher(fisher):
    torch.manual_seed(1)
    model = CausalToy().double()
    opt = natgrad.KFAC(model, lr=0.05, fisher=fisher, loss_reduction="mean")
    ids, y = _tokens(B=6, T=5)
    losses = []
    for _ in range(8):
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.curvature.updates == {"emb": 8, "lin": 8, "head": 8}
    assert losses[-1] < losses[0]


def test_data_capture_keeps_integer_token_ids():
    from natgrad.fisher import KFACOperator

    torch.manual_seed(0)
    model = CausalToy().double().eval()
    ids, y = _tokens()
    K = KFACOperator.from_data(model, (ids, y), fisher="exact")
    opt = _one_step(copy.deepcopy(model).train(), ids, y, fisher="exact")
    for name in ("lin", "head"):
        for f_data, f_opt in zip(K.factors[name], opt.factors[name]):
            torch.testing.assert_close(f_data.to_dense(), f_opt.to_dense(), rtol=1e-9,
                                       atol=1e-12)


# ---------------------------------------------------------------- 2. GradScaler
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches(n: int = 3, m: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, 5, generator=g, dtype=f64), torch.randint(0, 3, (m,), generator=g))
            for _ in range(n)]


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_grad_scaler_gives_the_unscaled_update(fisher):
    def run(scale):
        model = _mlp()
        scaler = (torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
                  if scale else None)
        opt = natgrad.KFAC(model, fisher=fisher, grad_scaler=scaler, inverse_every=1)
        for x, y in _batches():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return _params(model), opt

    ref, ref_opt = run(None)
    for scale in (1.0, 2.0**10, 2.0**16):
        got, opt = run(scale)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
        for name, (_, G) in ref_opt.factors.items():
            torch.testing.assert_close(opt.factors[name][1].to_dense(), G.to_dense(),
                                       rtol=1e-12, atol=1e-14)


def test_a_step_the_scaler_skips_leaves_no_statistics():
    model = _mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = natgrad.KFAC(model, fisher="empirical", grad_scaler=scaler)
    (x, y), (x2, y2) = _batches(2)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    scaler.scale(loss * float("inf")).backward()  # inf gradients: the scaler skips the step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler.step(opt)
    scaler.update()
    assert opt.steps == 0
    loss = F.cross_entropy(model(x2), y2)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    plain = _mlp()
    popt = natgrad.KFAC(plain, fisher="empirical")
    F.cross_entropy(plain(x2), y2).backward()
    popt.step()
    for name, (A, G) in popt.factors.items():
        torch.testing.assert_close(opt.factors[name][0].to_dense(), A.to_dense())
        torch.testing.assert_close(opt.factors[name][1].to_dense(), G.to_dense())


def test_autocast_keeps_factors_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = natgrad.KFAC(model, lr=0.1)
    for x, y in _batches():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(f.dtype == torch.float32 and torch.isfinite(f.to_dense()).all()
               for pair in opt.factors.values() for f in pair)
    assert opt.curvature.updates == {"0": 3, "2": 3}


# ---------------------------------------------------------------- 3. gradient accumulation
@pytest.mark.parametrize("fisher", FISHER_TYPES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("recipe", ["mean", "sum"])
def test_accumulation_equals_the_full_batch(fisher, K, recipe):
    (x, y), = _batches(1, m=8)
    full = _mlp()
    fopt = natgrad.KFAC(full, fisher=fisher, seed=3)
    F.cross_entropy(full(x), y).backward()
    fopt.step()
    acc = _mlp()
    aopt = natgrad.KFAC(acc, fisher=fisher, seed=3, accumulation=recipe)
    aopt.zero_grad()
    for xk, yk in zip(x.chunk(K), y.chunk(K)):
        loss = F.cross_entropy(acc(xk), yk)
        (loss / K if recipe == "mean" else loss).backward()
    aopt.step()
    for name, (A, G) in fopt.factors.items():
        torch.testing.assert_close(aopt.factors[name][0].to_dense(), A.to_dense(),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(aopt.factors[name][1].to_dense(), G.to_dense(),
                                   rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- 4./7. structured outputs
class DictNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body = _mlp()
        self.kind = kind

    def forward(self, x):
        out = self.body(x)
        if self.kind == "dict":
            return {"logits": out, "hidden": x}
        return (out, x)


def test_dict_output_uses_its_logits():
    model = DictNet("dict")
    opt = natgrad.KFAC(model, lr=0.1)
    for x, y in _batches():
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(opt.curvature.updates.values()) == {3}


def test_tuple_output_needs_output_key():
    model = DictNet("tuple")
    opt = natgrad.KFAC(model, lr=0.1)
    (x, y), = _batches(1)
    with pytest.raises(ValueError, match="output_key"):
        model(x)
    opt = natgrad.KFAC(model, lr=0.1, output_key=0)
    for x, y in _batches():
        loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(opt.curvature.updates.values()) == {3}


def test_forward_past_the_model_warns_by_name():
    inner = _mlp()
    wrapper = nn.Sequential(inner)
    opt = natgrad.KFAC(wrapper, lr=0.1)
    (x, y), = _batches(1)
    F.cross_entropy(inner(x), y).backward()  # the loop bypasses the module given to KFAC
    with pytest.warns(RuntimeWarning, match=r"reached layers \['0.0', '0.2'\] but not the output"):
        opt.step()
    assert set(opt.curvature.updates.values()) == {0}


def test_functionally_called_layer_is_reported_and_takes_the_plain_step():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):  # b's forward never runs: its weights are used functionally
            return F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)

    torch.manual_seed(0)
    model = Functional().double()
    opt = natgrad.KFAC(model, lr=0.1)
    (x, y), = _batches(1)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"\['b'\] are called functionally"):
        opt.step()
    assert set(opt.layers) == {"a"}
    assert "plain step      b (called functionally" in opt.registration_summary
    assert "b.weight: layer 'b': called functionally" in opt.registration_summary


# ---------------------------------------------------------------- 5. recursive damping
def test_recursive_applied_damping_stays_in_its_band():
    model = _mlp()
    opt = natgrad.KFAC(model, lr=0.05, factors="recursive", factor_decay=0.8,
                       inverse_every=10, damping=1e-2)
    for step, (x, y) in enumerate(_batches(25, seed=4)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for A, G in opt.factors.values():
            for f in (A, G):
                assert f.target_damping / 2 <= f.damping * (1 + 1e-12), (step, f.damping)
                assert f.damping <= 2 * f.target_damping * (1 + 1e-12)
    assert "damping now" in opt.registration_summary


# ---------------------------------------------------------------- 8. subclasses, reasons
def test_subclass_of_linear_is_preconditioned_and_every_plain_parameter_has_a_reason():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(5, 4), nn.PReLU(), nn.Linear(4, 3))
    model[2].bias.requires_grad_(False)
    opt = natgrad.KFAC(model, params=[p for p in model.parameters() if p.requires_grad])
    assert set(opt.layers) == {"0"}
    text = opt.registration_summary
    assert "0 [linear]" in text
    assert "1.weight: PReLU has no layer helper" in text
    assert "2.weight: layer '2': not all of its parameters are optimised" in text


# ---------------------------------------------------------------- 9. atomic load_state_dict
def _trained() -> natgrad.KFAC:
    model = _mlp()
    opt = natgrad.KFAC(model, lr=0.1)
    for x, y in _batches():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _corrupt(kind: str, sd: dict) -> dict:
    sd = copy.deepcopy(sd)
    if kind == "shape":
        sd["natgrad"]["factors"]["0"][0]["F"] = torch.zeros(3, 3, dtype=f64)
    elif kind == "generator":
        sd["natgrad"]["generator"] = torch.zeros(7, dtype=torch.uint8)
    elif kind == "missing":
        del sd["natgrad"]["skipped_steps"]
    elif kind == "factor_key":
        del sd["natgrad"]["factors"]["2"][1]["lam"]
    elif kind == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    return sd


@pytest.mark.parametrize("kind", ["shape", "generator", "missing", "factor_key", "groups"])
def test_failed_load_changes_nothing(kind):
    source, target = _trained(), _trained()
    target.steps = 99
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError):
        target.load_state_dict(_corrupt(kind, source.state_dict()))
    after = target.state_dict()
    assert target.steps == 99
    for name, pair in before["natgrad"]["factors"].items():
        for a, b in zip(pair, after["natgrad"]["factors"][name]):
            assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                       for k in a)
    assert torch.equal(before["natgrad"]["generator"], after["natgrad"]["generator"])


# ---------------------------------------------------------------- 10. bfloat16 weights
@pytest.mark.parametrize("factors", ["recursive", "cholesky", "eigh", "projected"])
def test_bfloat16_model_gets_float32_factors(factors):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).bfloat16()
    opt = natgrad.KFAC(model, lr=0.05, factors=factors, inverse_every=1,
                       factor_options={"rank": 2} if factors == "projected" else None)
    for x, y in _batches():
        loss = F.cross_entropy(model(x.bfloat16()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(f.dtype == torch.float32 for pair in opt.factors.values() for f in pair)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="factor_dtype"):
        natgrad.KFAC(model, factor_dtype=torch.bfloat16)


# ---------------------------------------------------------------- 11. validation
@pytest.mark.parametrize("lr", [np.float32(0.1), torch.tensor(0.1), np.float64(0.1), 1])
def test_numpy_and_tensor_scalars_are_accepted(lr, train):
    model = _mlp()
    opt = natgrad.KFAC(model, lr=lr, curvature_every=np.int64(1))
    train(model, opt, [(x, y) for x, y in _batches()])
    assert opt.steps == 3


@pytest.mark.parametrize("kw, name", [
    ({"precondition": "no"}, "precondition"), ({"seed": "abc"}, "seed"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"distributed": "junk"}, "distributed"),
    ({"loss_reduction": "avg"}, "loss_reduction"), ({"accumulation": "k"}, "accumulation"),
    ({"output_key": 1.5}, "output_key"), ({"grad_scaler": 3}, "grad_scaler"),
    ({"lr": True}, "lr"), ({"lr": torch.tensor([0.1, 0.2])}, "lr"),
])
def test_invalid_arguments_raise_before_any_hook(kw, name):
    model = _mlp()
    with pytest.raises(ValueError, match=name):
        natgrad.KFAC(model, **kw)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_callable_curvature_every_returning_zero_raises_before_the_update():
    model = _mlp()
    opt = natgrad.KFAC(model, curvature_every=lambda k: 1 if k == 0 else 0)
    before = _params(model)
    (x, y), = _batches(1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="curvature_every"):
        opt.step()
    assert opt.steps == 0 and torch.equal(_params(model), before)
    assert all(f.updates == 0 for pair in opt.factors.values() for f in pair)


# ---------------------------------------------------------------- 12. CLI output paths
@pytest.mark.parametrize("flag", ["--out", "--save-model"])
def test_unwritable_output_is_a_usage_error_before_training(tmp_path, capsys, flag):
    from natgrad.cli.main import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    target = str(blocker / "sub") if flag == "--out" else str(blocker / "x" / "m.pt")
    argv = ["compare", "--data", "teacher", "--hidden", "8", "--epochs", "1", "--no-progress",
            "--optimizers", "sgd", flag, target]
    if flag == "--save-model":
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err
    assert not (tmp_path / "out").exists()
