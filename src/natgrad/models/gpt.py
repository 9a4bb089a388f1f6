"""A small causal GPT for character-level language modelling, built from the layers natgrad
preconditions.

Token and position embeddings (``nn.Embedding``), ``depth`` pre-LayerNorm blocks of causal
multi-head attention (query / key / value / output projections as separate ``nn.Linear`` layers,
attention itself by ``F.scaled_dot_product_attention(is_causal=True)``) and a GELU MLP of width
``4·d``, a final ``nn.LayerNorm`` and an untied linear head. Every parameter is in an Embedding,
a LayerNorm or a Linear, so :class:`natgrad.KFAC` preconditions all of them.

Input ids ``(m, T)`` with ``T ≤ context``; output logits ``(m, T, vocab)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Causal multi-head self-attention: position ``t`` attends to positions ``≤ t``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(m, T, self.heads, d // self.heads).transpose(1, 2)  # (m, h, T, d_h)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=True)
        return self.out(y.transpose(1, 2).reshape(m, T, d))


class GPTBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + MLP(LN(x))``, the MLP ``d → 4d → d`` with GELU."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Embeddings → ``depth`` blocks → LayerNorm → head (see the module docstring).

    Args:
        vocab: number of token values (and of output classes).
        context: the longest input ``T`` (rows of the position embedding).
        width: the model width ``d``.
        depth: number of blocks.
        heads: attention heads (must divide ``width``).

    Linear and embedding weights start from ``N(0, 0.02²)``, as GPT-2's, with the two
    projections that write into the residual stream (attention output, MLP output) scaled by
    ``1/sqrt(2·depth)``; biases start at zero.
    """

    def __init__(self, vocab: int, context: int, width: int = 128, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        for name, v in (("vocab", vocab), ("context", context), ("width", width),
                        ("depth", depth), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if width % heads:
            raise ValueError(f"the width {width} must be a multiple of the heads {heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self._init(depth)

    def _init(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                proj.weight.data.mul_((2 * depth) ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m, T = ids.shape
        if T > self.context:
            raise ValueError(f"input of {T} tokens is longer than the context {self.context}")
        # positions per sample (not one shared row): each sample's own gradient reaches them
        pos = torch.arange(T, device=ids.device).expand(m, T)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(pos))))
