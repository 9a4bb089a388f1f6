"""A factor strategy written and registered in this file alone runs everywhere a strategy name is
accepted: the optimizer, the analysis, a 2-rank distributed step and ``bench scaling``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.factors import (
    STRATEGIES,
    FactorOptions,
    KroneckerFactor,
    register_strategy,
    unregister_strategy,
)
from natgrad.factors.options import check_real

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from _dist_harness import run_distributed  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ToyOptions(FactorOptions):
    """``floor``: added to every diagonal entry (a toy option, to check typed options)."""

    floor: float = 0.0

    def __post_init__(self) -> None:
        check_real("floor", self.floor, lambda v: v >= 0, "a number >= 0")


class ToyDiagonal(KroneckerFactor):
    """``F ≈ diag(F)``: the diagonal of the EMA of the second moments, ``O(d)``."""

    name = "toy_diagonal"
    Options = ToyOptions
    state_keys = ("diag",)
    statistics_keys = ("diag",)

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        self.diag = torch.zeros(dim, dtype=self.dtype, device=self.device)

    def _update(self, rows: Tensor, new_weight: float, keep: float,
                sq_norm: float | None = None) -> None:
        self.diag = keep * self.diag + new_weight * rows.square().sum(0)

    def trace(self) -> float:
        return float(self.diag.sum())

    def refresh(self, damping: float) -> None:
        self.damping, self.refreshed = float(damping), True

    def inv_matmul(self, v: Tensor) -> Tensor:
        return v / (self.diag + self.options.floor + self.damping).unsqueeze(-1)

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag + self.options.floor)

    def cost(self) -> float:
        return float(self.dim)


def _register() -> None:
    if "toy_diagonal" not in STRATEGIES:
        register_strategy(ToyDiagonal)


@pytest.fixture()
def toy():
    _register()
    yield "toy_diagonal"
    unregister_strategy("toy_diagonal")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(steps: int = 4, n: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def _train(model, opt, batches) -> None:
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_optimizer_uses_the_toy_factors(toy):
    model = _model()
    opt = natgrad.KFAC(model, lr=0.1, factors=toy, factor_options={"floor": 0.5},
                       fisher="empirical", kl_clip=None, inverse_every=1)
    assert all(isinstance(f, ToyDiagonal) for pair in opt.factors.values() for f in pair)
    assert "toy_diagonal(d=7)" in opt.registration_summary
    with pytest.raises(ValueError, match="floor"):
        natgrad.KFAC(_model(), factors=toy, factor_options={"floor": -1.0})
    # one step: the direction is (G + δ_G)⁻¹ ∇W (A + δ_A)⁻¹ with the diagonal factors (π-split)
    x, y = _data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    grads = []
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    A, G = opt.factors["2"]
    V = torch.cat([grads[2], grads[3][:, None]], dim=1)
    D = G.inv_matmul(A.inv_matmul(V.T).T)
    step = torch.cat([before[2] - model[2].weight, (before[3] - model[2].bias)[:, None]], dim=1)
    torch.testing.assert_close(step, 0.1 * D, rtol=1e-10, atol=1e-12)
    _train(model, opt, _data(3))
    assert opt.factors["0"][0].updates == 4


def test_analysis_compares_the_toy_approximation(toy):
    from natgrad.fisher import KFACOperator
    from natgrad.fisher.analysis import analyze

    model = _model().eval()
    X = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (16,))
    K = KFACOperator.from_data(model, (X, y), strategy=toy)
    A, G = K.factors["0"]
    assert isinstance(A, ToyDiagonal)
    W, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    zeros = [torch.zeros(5, 3, dtype=torch.float64).T, torch.zeros(3, dtype=torch.float64)]
    KW, Kb, *rest = K @ [W, b, *zeros]
    V = torch.cat([W, b[:, None]], dim=1)  # (d_G, d_A): the block is V -> G V A
    torch.testing.assert_close(torch.cat([KW, Kb[:, None]], dim=1),
                               G.to_dense() @ V @ A.to_dense())
    assert all(float(t.abs().max()) == 0 for t in rest)  # another layer's block
    # 16 probes: with 2 the estimates are too noisy to order the two approximations
    report = analyze(model, (X, y), "cross_entropy", top_k=2, density=False, probes=16,
                     approximations={"toy": (toy, None), "kfac": ("eigh", None)})
    assert set(report["approximations"]) == {"toy", "kfac"}
    toy_err = report["approximations"]["toy"]["relative_error"]["value"]
    kfac_err = report["approximations"]["kfac"]["relative_error"]["value"]
    assert 0 < kfac_err < toy_err  # the diagonal approximation is the cruder one
    assert all("toy_relative_error" in row for row in report["layers"])


def toy_rank_worker(rank: int, world: int) -> dict[str, Any]:
    """2 ranks with the toy strategy (owner updates, broadcast of its state) against one process
    on the concatenated batches."""
    from natgrad.distributed import DistributedKFAC, shard

    _register()  # this process imported the test file only to find this function
    kw = dict(lr=0.1, factors="toy_diagonal", fisher="empirical", inverse_every=2)
    model = _model()
    opt = natgrad.KFAC(model, distributed=DistributedKFAC(), **kw)
    for x, y in _data():
        x, y = shard((x, y))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    ref = _model()
    ref_opt = natgrad.KFAC(ref, distributed=False, **kw)
    _train(ref, ref_opt, _data())
    return {"params": [p.detach() for p in model.parameters()],
            "ref": [p.detach() for p in ref.parameters()],
            "owner": dict(opt.distributed.owner),
            "diag": {n: [f.diag.clone() for f in pair] for n, pair in opt.factors.items()}}


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed gloo")
def test_two_rank_step_with_the_toy_strategy(toy):
    runs = run_distributed(toy_rank_worker, world=2, timeout=120)
    assert runs[0]["owner"] == runs[1]["owner"] and set(runs[0]["owner"].values()) == {0, 1}
    for res in runs:
        for p, q in zip(res["params"], res["ref"]):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    for name, diags in runs[0]["diag"].items():  # owners broadcast the state: identical
        for a, b in zip(diags, runs[1]["diag"][name]):
            assert torch.equal(a, b)


def test_bench_scaling_measures_the_toy_strategy(toy, tmp_path, capsys):
    from natgrad.bench.scaling import ScalingConfig, run_scaling
    from natgrad.cli.main import main

    doc = run_scaling(ScalingConfig(widths=(8, 16), ranks=(4,), strategies=(toy, "projected"),
                                    repeats=1, warmup=1, fast_factor=1), progress=False)
    labels = {(r["strategy"], r["rank"]) for r in doc["results"]}
    assert labels == {(toy, None), ("projected", 4)}
    assert doc["slopes"][toy] is not None
    assert main(["bench", "scaling", "--widths", "8,16", "--ranks", "4", "--strategies", toy,
                 "--repeats", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert toy in capsys.readouterr().out
