"""natgrad as a laplace-torch backend, against laplace-torch's BackPACK and curvlinops backends
(skipped when laplace-torch is not installed: it is an optional extra)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")
curvature = pytest.importorskip("laplace.curvature")

from natgrad.fisher import KFACOperator  # noqa: E402
from natgrad.fisher.kron import kfac_top_eigenpairs  # noqa: E402
from natgrad.integrations.laplace import NatgradEF, NatgradGGN, kron_blocks  # noqa: E402

TOL = 1e-6


def close(a, b, tol=TOL):
    assert float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) < tol


def case(name, likelihood="classification", n=12):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        X = torch.randn(n, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
        X = torch.randn(n, 1, 6, 6, dtype=torch.float64)
    y = (torch.randint(0, 3, (n,)) if likelihood == "classification"
         else torch.randn(n, 3, dtype=torch.float64))
    return model, DataLoader(TensorDataset(X, y), batch_size=n)


def fitted(model, loader, structure, backend, likelihood="classification", **kwargs):
    la = laplace.Laplace(model, likelihood, subset_of_weights="all",
                         hessian_structure=structure, backend=backend, **kwargs)
    la.fit(loader)
    return la


def precision(la):
    P = la.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else P


# the reference backend per structure: BackPACK for full and diag; curvlinops for kron (BackPACK's
# conv K-FAC has another convention, and its EF has no Kronecker form)
REFERENCES = {
    ("full", "ggn"): "BackPackGGN", ("full", "ef"): "BackPackEF",
    ("diag", "ggn"): "BackPackGGN", ("diag", "ef"): "BackPackEF",
    ("kron", "ggn"): "CurvlinopsGGN", ("kron", "ef"): "CurvlinopsEF",
}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_posterior_matches_laplace_torch_backends(name, structure, kind, likelihood):
    model, loader = case(name, likelihood)
    ours = NatgradGGN if kind == "ggn" else NatgradEF
    ref = getattr(curvature, REFERENCES[(structure, kind)])
    # each its own copy: BackPACK extends the modules it sees
    a = fitted(copy.deepcopy(model), loader, structure, ours, likelihood, prior_precision=0.5)
    b = fitted(copy.deepcopy(model), loader, structure, ref, likelihood, prior_precision=0.5)
    close(precision(a), precision(b))
    close(a.log_marginal_likelihood(), b.log_marginal_likelihood())
    X = next(iter(loader))[0][:3]
    if likelihood == "classification":
        close(a(X, link_approx="probit"), b(X, link_approx="probit"))
    else:
        for u, v in zip(a(X), b(X)):
            close(u, v)


def test_kron_of_every_layer_type_is_natgrads_kfac():
    """Embedding, LayerNorm, Linear: the Kron blocks are natgrad's K-FAC blocks (times N), with
    the weight–bias cross terms laplace-torch has no place for left out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    X, y = torch.randint(0, 6, (10, 2)), torch.randint(0, 3, (10,))
    backend = NatgradGGN(model, "classification")
    _, kron = backend.kron(X, y, N=10)
    K = KFACOperator.from_data(model, (X, y)).to_dense() * 10
    offsets = [0]
    for p in model.parameters():
        offsets.append(offsets[-1] + p.numel())
    mask = torch.zeros_like(K, dtype=torch.bool)
    for a, b in zip(offsets, offsets[1:]):
        mask[a:b, a:b] = True
    close(kron.to_matrix(), torch.where(mask, K, 0.0), 1e-10)
    with pytest.raises(ValueError, match="in no layer"):
        kron_blocks(KFACOperator.from_data(model, (X, y)), list(model.parameters())
                    + [nn.Parameter(torch.zeros(2))], 1.0, 1.0)


def test_lowrank_from_projected_factors(monkeypatch):
    # LowRankLaplace refuses to start unless the old git-only asdfghjkl (its default backend) is
    # importable, even when another backend is given: satisfy that check only
    import laplace.baselaplace as base

    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda name: object() if name == "asdfghjkl"
                        else real(name))
    model, loader = case("mlp", n=16)
    kwargs = {"strategy": "projected", "factor_options": {"rank": 2}, "low_rank": 4}
    la = base.LowRankLaplace(model, "classification", backend=NatgradGGN, backend_kwargs=kwargs)
    la.fit(loader)
    U, values = la.H
    X, y = loader.dataset.tensors
    top = kfac_top_eigenpairs(KFACOperator.from_data(model, (X, y), strategy="projected",
                                                     factor_options={"rank": 2}), 4)
    close(values, top[0] * 16, 1e-10)
    close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), 1e-10)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(X[:3], pred_type="glm", link_approx="probit")
    close(probs.sum(-1), torch.ones(3, dtype=probs.dtype))


def test_unsupported_options_are_refused():
    model, _ = case("mlp")
    with pytest.raises(ValueError, match="last_layer"):
        NatgradGGN(model, "classification", last_layer=True)
    with pytest.raises(ValueError, match="low_rank"):
        NatgradEF(model, "classification", low_rank=0)
