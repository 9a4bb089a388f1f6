"""The memory plan of the analysis: what it picks under a budget, the error when nothing fits,
and that a planned analysis still matches the dense float64 references."""

import pytest
import torch
from torch import nn

from natgrad.cli.main import main
from natgrad.fisher.analysis import analyze
from natgrad.fisher.budget import GB, BudgetError, available_bytes, plan_analysis
from natgrad.fisher.dense import dense_ggn

P = 20_000_000


def test_plan_shrinks_the_basis_then_refuses_with_what_would_fit():
    roomy = plan_analysis(P, 4, 1 << 28, 64 * GB)
    assert roomy.max_basis == 24 and roomy.basis_dtype == torch.float32
    assert roomy.peak == max(roomy.stages.values()) <= 64 * GB
    # the peak is the top-k basis; SLQ is streamed since a kept basis would raise it
    assert not roomy.slq_reorthogonalize and roomy.min_steps == 0
    tight = plan_analysis(P, 4, 1 << 28, roomy.stages["top_k"] - 4 * P * 4)
    assert tight.max_basis < roomy.max_basis and tight.peak <= tight.budget
    with pytest.raises(BudgetError, match="--memory-gb") as err:
        plan_analysis(P, 4, 1 << 28, 1 * GB)
    need = float(str(err.value).split("--memory-gb ")[1].split()[0])
    assert plan_analysis(P, 4, 1 << 28, int(need * GB)).max_basis <= 18  # the smallest fits
    assert "memory plan" in str(err.value)


def test_plan_keeps_the_basis_of_slq_runs_and_the_first_probe_when_they_fit_under_the_peak():
    plan = plan_analysis(P, 4, 0, 64 * GB, top_k=10, slq_steps=20, probes=4)
    assert plan.min_steps == 20 and plan.slq_reorthogonalize
    assert plan.stages["density"] <= plan.stages["top_k"]


def test_available_bytes_is_positive():
    assert available_bytes() > 0


def test_planned_analysis_matches_the_dense_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    F = dense_ggn(model, X)
    lam = torch.linalg.eigvalsh(F).flip(0)
    plans = []
    report = analyze(model, (X, y), "cross_entropy", top_k=4, probes=3, slq_steps=12,
                     tol=1e-8, memory_bytes=GB, on_plan=plans.append)
    assert plans and report["memory_plan"]["max_basis"] == plans[0].max_basis == 12
    assert torch.allclose(torch.tensor(report["top_eigenvalues"], dtype=torch.float64), lam[:4],
                          rtol=1e-8)
    assert max(report["top_residuals"]) <= 1e-8
    assert abs(report["trace"]["value"] - float(F.trace())) < 1e-10 * float(F.trace())
    truth = float(torch.log(lam.clamp_min(0) + 1e-3).sum())
    assert abs(report["logdet"]["value"] - truth) < 3 * report["logdet"]["error"]
    with pytest.raises(BudgetError, match="--memory-gb"):
        analyze(model, (X, y), "cross_entropy", top_k=4, memory_bytes=1000)


def test_cli_fails_fast_with_the_plan(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "--model", "mlp", "--hidden", "16,16", "--samples", "20",
            "--memory-gb", "0.0001", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("natgrad analyze: error: ") and "--memory-gb" in err
    assert "memory plan" in err and not (out / "report.json").exists()


def test_freed_memory_goes_back_to_the_system_on_glibc():
    import sys

    from natgrad.fisher._memory import release_freed_memory

    blocks = [torch.ones(1 << 18) for _ in range(64)]  # 1 MB each: below glibc's mmap threshold
    del blocks
    assert release_freed_memory() is sys.platform.startswith("linux")
