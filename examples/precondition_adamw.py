"""Projected K-FAC in front of AdamW on a small causal transformer.

What it shows: ``natgrad.KFAC(..., preconditioner=True)`` writes the natural-gradient direction
into ``.grad`` and :class:`natgrad.optim.PreconditionedOptimizer` pairs it with
``torch.optim.AdamW``, which takes the step; a cosine LR scheduler acts on the pair as on any
``torch.optim`` optimizer. The model is natgrad's small transformer (Embedding, LayerNorm,
attention written with ``nn.Linear``, MLP blocks): every one of its parameters is
preconditioned, as the registration summary says. The task is the generated running-majority
sequence task (per-token cross-entropy over logits of shape ``(B, T, V)``).

Run it from the repository root::

    python examples/precondition_adamw.py               # 3 epochs on 4,000 sequences
    python examples/precondition_adamw.py --epochs 6 --lr 3e-3
    python examples/precondition_adamw.py --smoke       # a few seconds: 2,048 sequences, 1 epoch
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_dataset
from natgrad.models import build_model
from natgrad.optim import PreconditionedOptimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: 2,048 training and 256 test sequences, one epoch")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def token_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of positions whose argmax token is the target; x, y: (N, T) int64."""
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    train_set, test_set = load_dataset("majority")  # x, y: (N, 16) int64 tokens / targets
    epochs = args.epochs
    if args.smoke:
        train_set, test_set, epochs = train_set.subset(2048), test_set.subset(256), 1

    torch.manual_seed(args.seed)
    model = build_model("transformer", train_set.info)  # logits (B, T, V)
    pre = natgrad.KFAC(model, factors="projected", preconditioner=True, curvature_every=10,
                       inverse_every=10, factor_decay=0.8, seed=args.seed)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    optimizer = PreconditionedOptimizer(pre, inner)
    print(pre.registration_summary)

    generator = torch.Generator().manual_seed(args.seed)  # the batch order
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         generator=generator)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    accuracy = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # mean over tokens
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - start
        accuracy = token_accuracy(model, test_set.x, test_set.y)
        print(f"epoch {epoch}: last batch loss {loss.item():.4f}, test token accuracy "
              f"{accuracy:.4f}, lr {schedule.get_last_lr()[0]:.2e} ({seconds:.1f} s)")
    print(f"final test token accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
