"""A small causal transformer for token sequences, built from the layers natgrad preconditions.

Token and position embeddings (``nn.Embedding``), pre-norm blocks of causal multi-head attention
written with ``nn.Linear`` projections (no fused in-projection) and a GELU MLP, a final
``nn.LayerNorm`` and a linear head: every parameter is in an Embedding, a LayerNorm or a Linear.
Input ids ``(m, T)``; output logits ``(m, T, num_classes)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position ``t`` sees positions ``≤ t``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"the width {d} must be a multiple of the heads {heads}")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(m, T, h, d // h).transpose(1, 2)  # (m, h, T, d_h)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(m, T, d))


class Block(nn.Module):
    """``x + attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, d: int, heads: int, mlp: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, mlp * d), nn.GELU(), nn.Linear(mlp * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Embeddings → ``layers`` blocks → LayerNorm → head (see the module docstring)."""

    def __init__(self, vocab: int, num_classes: int, length: int, d: int = 64, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m, T = ids.shape
        # positions per sample (not one shared row): each sample's own gradient reaches them
        pos = torch.arange(T, device=ids.device).expand(m, T)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(pos))))
