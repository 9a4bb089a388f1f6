import types
import warnings

import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    return model, X, y


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()
    X = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, X, y


# ---------------------------------------------------------------- the zoo: patterns of the
# architectures users bring (timm-style residual blocks with in-place ops, transformer blocks
# with F.scaled_dot_product_attention, tied embeddings), tiny, float64, eval mode
class ResidualNet(nn.Module):
    """conv-BN-ReLU → (conv-BN-ReLU-conv-BN, ``x += shortcut``, ReLU) → pool → Linear: three
    normalization layers; ``inplace`` uses ``ReLU(inplace=True)`` and ``out += shortcut`` as
    timm's ResNet does, otherwise out-of-place ops (the same function)."""

    def __init__(self, inplace: bool = True, channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        shortcut = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += shortcut
        else:
            out = out + shortcut
        out = self.act(out)
        return self.head(out.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Token + position embeddings → pre-LN causal self-attention → pre-LN MLP → LN → head:
    logits ``(B, T, V)``. ``sdpa``: attention by ``F.scaled_dot_product_attention`` (no
    forward-mode AD on CPU), else written out (softmax of the masked scores; the same
    function). ``tied``: the head is the token embedding (``head.weight is tok.weight``)."""

    def __init__(self, sdpa: bool = True, tied: bool = False, vocab: int = 7, width: int = 4,
                 heads: int = 2, positions: int = 5) -> None:
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(positions, width)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width,
                                                                                   width))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sdpa:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        T = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        x = x + self.proj(self.attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))


class ReusedLM(nn.Module):
    """Every way a parameter is used twice: the head tied to the token embedding, one Linear
    called twice, and a Linear's weight used again functionally (``F.linear``)."""

    def __init__(self, vocab: int = 6, width: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.twice = nn.Linear(width, width)
        self.again = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.twice(torch.tanh(self.twice(self.tok(ids)))))
        h = torch.tanh(self.again(h)) + 0.5 * torch.nn.functional.linear(h, self.again.weight)
        return self.head(h)


class InplaceActNet(nn.Module):
    """Linear → ``Hardswish(inplace=True)`` → Linear, ``h += shortcut`` → Linear: in-place ops
    that are not idempotent (a second application changes the values), as MobileNet's
    activations."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.act = nn.Hardswish(inplace=True)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.inp(x)
        h = self.mid(self.act(self.inp(x)))
        h += shortcut
        return self.head(self.act(h))


class PaddedLM(nn.Module):
    """Token embedding with ``padding_idx=0`` → tanh → Linear → head: logits ``(B, T, V)``;
    ``tied``: the head is the embedding (its padding row then has the head's derivative)."""

    def __init__(self, tied: bool = False, vocab: int = 6, width: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(torch.tanh(self.tok(ids)))))


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm is identity-like)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return model


def make_residual(inplace: bool = True, seed: int = 3):
    """``(model, X, y)``: :class:`ResidualNet` in eval mode, float64, 5 images 1×5×5."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _randomise_norms(ResidualNet(inplace), gen).double().eval()
    X = torch.randn(5, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    return model, X, y


def make_transformer(sdpa: bool = True, tied: bool = False, seed: int = 4):
    """``(model, ids, y)``: :class:`TinyTransformer`, float64, 3 sequences of 5 tokens."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _randomise_norms(TinyTransformer(sdpa, tied), gen).double().eval()
    ids = torch.randint(0, 7, (3, 5), generator=gen)
    y = torch.randint(0, 7, (3, 5), generator=gen)
    return model, ids, y


def make_reused(seed: int = 5):
    """``(model, ids, y)``: :class:`ReusedLM`, float64, 3 sequences of 4 tokens."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ReusedLM().double().eval()
    ids = torch.randint(0, 6, (3, 4), generator=gen)
    y = torch.randint(0, 6, (3, 4), generator=gen)
    return model, ids, y


def make_inplace_act(seed: int = 7):
    """``(model, X, y)``: :class:`InplaceActNet`, float64, 5 samples of 3 features."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = InplaceActNet().double().eval()
    X = 2 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    return model, X, y


def make_padded(tied: bool = False, seed: int = 8):
    """``(model, ids, y)``: :class:`PaddedLM`, float64, 3 sequences of 4 tokens, each with
    the padding id 0."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = PaddedLM(tied).double().eval()
    with torch.no_grad():  # a padding row that is not zero: its derivative would show
        model.tok.weight[0] = torch.randn(model.tok.weight.shape[1], generator=gen)
    ids = torch.randint(1, 6, (3, 4), generator=gen)
    ids[:, -1] = 0
    y = torch.randint(0, 6, (3, 4), generator=gen)
    return model, ids, y


def make_gpt2(seed: int = 6):
    """``(model, ids, y)``: a transformers GPT-2 from a tiny config (tied ``wte``/``lm_head``,
    default attention: ``"sdpa"``), float64, eval mode; the test is skipped without
    transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23,
                                     n_positions=8)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 23, (2, 6), generator=gen)
    y = torch.randint(0, 23, (2, 6), generator=gen)
    return model, ids, y


def dense_fisher(model: nn.Module, x: torch.Tensor, fisher: str = "exact",
                 y: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float64 Fisher ``(P, P)`` of a classifier (logits ``(N, C)``) or sequence model
    (``(N, T, V)``, or a ``ModelOutput`` with ``.logits``) from ``torch.func.jacrev`` over the
    model's (deduplicated) ``named_parameters``: every use of a tied parameter is in its
    Jacobian column. ``"exact"``: ``(1/N) Σ_n Σ_t J_ntᵀ (diag p − ppᵀ) J_nt``;
    ``"empirical"``: ``(1/N) Σ_n g_n g_nᵀ`` with ``g_n = Σ_t J_ntᵀ (p_nt − e_{y_nt})``."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**buffers, **dict(zip(names, ps))}, (x,))
        return out if isinstance(out, torch.Tensor) else out.logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's missing batching rules (a loop, exact)
        jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*params)
    with torch.no_grad():
        logits = f(*params)
    N, C = logits.shape[0], logits.shape[-1]
    P = sum(p.numel() for p in params)
    J = torch.cat([j.reshape(*logits.shape, -1) for j in jac], dim=-1).reshape(N, -1, C, P)
    p = torch.softmax(logits.reshape(N, -1, C), -1)
    if fisher == "exact":
        H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return torch.einsum("ntvp,ntvw,ntwq->pq", J, H, J) / N
    r = p - torch.nn.functional.one_hot(y.reshape(N, -1), C).to(p.dtype)
    g = torch.einsum("ntv,ntvp->np", r, J)
    return g.T @ g / N


#: the zoo's case table: name → builder of ``(model, x, y)``
ZOO = {
    "residual_inplace": lambda: make_residual(inplace=True),
    "residual_plain": lambda: make_residual(inplace=False),
    "transformer_sdpa": lambda: make_transformer(sdpa=True),
    "transformer_eager": lambda: make_transformer(sdpa=False),
    "transformer_tied": lambda: make_transformer(sdpa=False, tied=True),
    "transformer_untied": lambda: make_transformer(sdpa=False, tied=False),
    "reused": make_reused,
    "inplace_act": make_inplace_act,
    "padded": lambda: make_padded(tied=False),
    "padded_tied": lambda: make_padded(tied=True),
    "gpt2": make_gpt2,
}


@pytest.fixture
def zoo():
    """The zoo: ``zoo.build(name)`` → ``(model, x, y)`` (names in :data:`ZOO`) and
    ``zoo.dense_fisher`` (:func:`dense_fisher`)."""
    return types.SimpleNamespace(build=lambda name: ZOO[name](), dense_fisher=dense_fisher)
