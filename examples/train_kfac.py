"""Train the embedded-MNIST MLP with ``natgrad.KFAC`` and projected Kronecker factors.

What it shows: ``natgrad.KFAC`` as a drop-in ``torch.optim`` optimizer in a plain training loop
(``zero_grad`` / ``backward`` / ``step``), with the projected factor strategy (each Kronecker
factor kept as a rank-``r`` eigen-subspace plus a scaled identity), the registration summary,
and the test accuracy after each epoch.

Run it from the repository root::

    python examples/train_kfac.py                  # 3 epochs on the 4,000 training digits
    python examples/train_kfac.py --rank 32 --epochs 5
    python examples/train_kfac.py --smoke          # a few seconds: 512 samples, 1 epoch

The settings are those of ``natgrad compare``'s ``pkfac`` (rank 24, curvature and refresh every
10 steps, factor decay 0.8 per refresh, learning rate 0.1).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_dataset
from natgrad.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=24, help="rank of each projected factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: 512 training and 256 test samples, one epoch")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "lr", "rank"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    train_set, test_set = load_dataset("mnist5k")  # x: (N, 1, 28, 28) in [0, 1], y: (N,)
    epochs = args.epochs
    if args.smoke:
        train_set, test_set, epochs = train_set.subset(512), test_set.subset(256), 1

    torch.manual_seed(args.seed)
    model = build_model("mlp", train_set.info)  # 784-256-128-10, ReLU
    optimizer = natgrad.KFAC(
        model, lr=args.lr, loss="cross_entropy", factors="projected",
        factor_options={"rank": args.rank}, curvature_every=10, inverse_every=10,
        factor_decay=0.8, seed=args.seed,
    )
    print(optimizer.registration_summary)

    generator = torch.Generator().manual_seed(args.seed)  # the batch order
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         generator=generator)
    accuracy = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_set.x).argmax(1) == test_set.y).float().mean().item()
        print(f"epoch {epoch}: last batch loss {loss.item():.4f}, test accuracy {accuracy:.4f} "
              f"({seconds:.1f} s)")
    print(f"final test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
