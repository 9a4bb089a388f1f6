"""Statistics capture (natgrad.capture): what the hooks record does not depend on how the model
computes after the preconditioned layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad.curvature import FISHER_TYPES, CurvatureCapture
from natgrad.layers import helper_for
from natgrad.likelihoods import get_likelihood


def _statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str) -> dict:
    layers = {name: helper_for(m)[0] for name, m in model.named_modules()
              if isinstance(m, nn.Linear)}
    capture = CurvatureCapture(model, layers, get_likelihood("cross_entropy"), fisher=fisher,
                               generator=torch.Generator().manual_seed(1))
    capture.active = True
    F.cross_entropy(model(x), y).backward()
    return capture.collect()


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_in_place_activation_leaves_statistics_unchanged(fisher):
    """A ReLU(inplace=True) right after a layer overwrites that layer's output: the output
    gradients must still be taken before the activation, exactly as with an out-of-place ReLU."""
    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3)).double()

    plain, in_place = net(False), net(True)
    in_place.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    expected, got = _statistics(plain, x, y, fisher), _statistics(in_place, x, y, fisher)
    assert set(got) == set(expected) == {"0", "2"}
    for name in expected:
        torch.testing.assert_close(got[name].a, expected[name].a, rtol=0, atol=0)
        torch.testing.assert_close(got[name].g, expected[name].g, rtol=1e-12, atol=1e-14)
        # the first layer's output gradients are zero where the ReLU was inactive
        assert got[name].g.abs().sum() > 0
    inactive = in_place[0](x).detach() <= 0  # (8, 6); "exact" stacks one block per class
    assert (got["0"].g[inactive.repeat(got["0"].g.shape[0] // 8, 1)] == 0).all()
    # the parameter gradients of the user's loss are untouched by the capture
    ref = net(False)
    ref.load_state_dict(plain.state_dict())
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(in_place.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
