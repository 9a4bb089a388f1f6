"""natgrad.norms: reductions over tensor lists with one sync, for gradients and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from natgrad.norms import all_finite, dot, finite_total, squared_norms, to_floats


def test_dot_and_squared_norms_match_plain_sums():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert float(dot(a, b)) == pytest.approx(float((a * b).sum()), rel=1e-14)
    assert float(dot(a.T, b.T)) == pytest.approx(float((a * b).sum()), rel=1e-14)  # strided
    half = a.to(torch.float16)
    norms = squared_norms([a, a.T, half])
    assert float(norms[0]) == pytest.approx(float((a * a).sum()), rel=1e-14)
    assert float(norms[1]) == pytest.approx(float((a * a).sum()), rel=1e-6)
    assert norms[2].dtype == torch.float32  # half precision accumulates in float32
    assert float(norms[2]) == pytest.approx(float((half.float() ** 2).sum()), rel=1e-6)


def test_to_floats_mixes_dtypes():
    values = [torch.tensor(1.5, dtype=torch.float32), torch.tensor(2.25, dtype=torch.float64)]
    assert to_floats(values) == [1.5, 2.25]
    assert to_floats([]) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_finiteness_checks(bad):
    ok = [torch.ones(3), torch.zeros(2, 2)]
    assert all_finite(ok) and finite_total(squared_norms(ok)) and all_finite([])
    broken = [torch.ones(3), torch.tensor([0.0, bad])]
    # an entry whose square overflows float32 (1e30) is flagged too: the check is conservative
    assert not all_finite(broken)
    assert math.isfinite(sum(to_floats(squared_norms(ok))))
