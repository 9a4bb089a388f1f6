"""Influence scores and EWC importance against dense float64 references on a tiny model."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from natgrad.fisher import EKFACOperator, ExactFisher, KFACOperator
from natgrad.fisher.dense import dense_ggn
from natgrad.fisher.influence import (
    DiagonalOperator,
    ewc_importance,
    ewc_penalty,
    influence,
    influence_scores,
    sample_gradients,
)

LAM = 0.05


def close(a, b, tol=1e-8):
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) < tol


def reference_gradients(model, X, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p, x, t):
        out = functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, t[None])

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[n].reshape(len(X), -1) for n in params], dim=1)


def split(X, y):
    return (X[:5], y[:5]), (X[5:], y[5:])


def test_sample_gradients(tiny_cnn):
    model, X, y = tiny_cnn
    close(sample_gradients(model, (X, y), chunk_size=2), reference_gradients(model, X, y))


@pytest.mark.parametrize("method", ["cg", "kfac", "ekfac"])
def test_influence_matches_the_dense_inverse(method, tiny_mlp):
    model, X, y = tiny_mlp
    train, test = split(X, y)
    scores = influence(model, train, test, method=method, damping=LAM,
                       **({"tol": 1e-13} if method == "cg" else {}))
    if method == "cg":
        H = dense_ggn(model, train[0])
    else:
        K = KFACOperator.from_data(model, train)
        H = K.to_dense() if method == "kfac" else EKFACOperator.from_fisher(
            ExactFisher(model, train), K).to_dense()
    inv = torch.linalg.inv(H + LAM * torch.eye(H.shape[0], dtype=H.dtype))
    g_train, g_test = reference_gradients(model, *train), reference_gradients(model, *test)
    assert scores.shape == (2, 5)
    close(scores, g_test @ inv @ g_train.T)


def test_influence_scores_checks_shapes(tiny_mlp):
    model, X, y = tiny_mlp
    K = KFACOperator.from_data(model, (X, y))
    from natgrad.fisher import KFACInverse

    inv = KFACInverse(K, LAM)
    g = torch.randn(3, K.dim, dtype=torch.float64)
    assert influence_scores(inv, g[0], g).shape == (1, 3)
    with pytest.raises(ValueError, match="train_gradients"):
        influence_scores(inv, g, g[:, :-1])
    with pytest.raises(ValueError, match="method"):
        influence(model, (X, y), (X, y), method="arnoldi")


@pytest.mark.parametrize("kind", ["diagonal", "kfac"])
def test_ewc_penalty_and_its_gradient(kind, tiny_mlp):
    model, X, y = tiny_mlp
    F = ewc_importance(model, (X, y), kind=kind)
    dense = dense_ggn(model, X)
    if kind == "diagonal":
        assert isinstance(F, DiagonalOperator)
        close(F.diagonal(), dense.diagonal())
        ref = torch.diag(dense.diagonal())
    else:
        ref = KFACOperator.from_data(model, (X, y)).to_dense()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pen = ewc_penalty(model, anchor, F, strength=3.0)
    delta = torch.cat([(p - anchor[n]).reshape(-1) for n, p in model.named_parameters()]).detach()
    close(pen.detach(), 1.5 * delta @ ref @ delta)
    pen.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    close(grads, 3.0 * ref @ delta)
    assert float(ewc_penalty(model, list(anchor.values()), F, strength=0.0).detach()) == 0.0
    with pytest.raises(ValueError, match="strength"):
        ewc_penalty(model, anchor, F, strength=-1.0)
    with pytest.raises(ValueError, match="anchor"):
        ewc_penalty(model, {}, F)
    with pytest.raises(ValueError, match="kind"):
        ewc_importance(model, (X, y), kind="full")
