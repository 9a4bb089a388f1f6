"""Conv2dHelper.input_rows (strided-view patches) against F.unfold, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad.layers import helper_for


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
@pytest.mark.parametrize("kw", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0)},
    {"kernel_size": 2, "dilation": 2, "padding": 1, "bias": False},
    {"kernel_size": (2, 3), "dilation": (1, 2), "stride": 2},
    {"kernel_size": 4, "padding": "same"},
    {"kernel_size": 3, "padding": "valid", "bias": False},
])
def test_input_rows_equal_unfold(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kw)
    x = torch.randn(5, 3, 9, 8)
    rows = helper_for(conv)[0].input_rows(x)
    xu, pad = x, conv.padding
    if kw.get("padding") == "same":  # asymmetric: pad explicitly
        k = conv.kernel_size[0] - 1
        xu, pad = F.pad(x, (k // 2, k - k // 2, k // 2, k - k // 2)), 0
    elif kw.get("padding") == "valid":
        pad = 0
    ref = F.unfold(xu, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    ref = ref.transpose(1, 2).reshape(-1, ref.shape[1])
    W = conv.weight.reshape(4, -1)
    if conv.bias is not None:
        ref = torch.cat([ref, ref.new_ones(ref.shape[0], 1)], dim=1)
        W = torch.cat([W, conv.bias[:, None]], dim=1)
    assert rows.shape == ref.shape and torch.equal(rows, ref)
    # and the rows reproduce the convolution
    out = conv(x).flatten(2).transpose(1, 2)  # (m, T, c_out)
    assert torch.allclose((rows @ W.T).reshape(out.shape), out, atol=1e-5)


def test_output_grad_matrix_is_the_rows_per_sample():
    conv = nn.Conv2d(3, 4, 3, stride=2)
    helper = helper_for(conv)[0]
    g = torch.randn(5, 4, 3, 2)
    rows = helper.output_grad_rows(g)
    assert torch.equal(helper.output_grad_matrix(g), rows.reshape(5, -1, 4))
    lin = helper_for(nn.Linear(3, 4))[0]  # the default: rows reshaped
    g = torch.randn(5, 2, 4)
    assert torch.equal(lin.output_grad_matrix(g), lin.output_grad_rows(g).reshape(5, 2, 4))
