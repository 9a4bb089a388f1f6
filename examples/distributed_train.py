"""Data-parallel training with ``natgrad.KFAC`` on ``torch.distributed`` (DDP, gloo on CPU).

What it shows: the training loop of docs/DISTRIBUTED.md. ``init_from_env`` sets up the process
group from the ``torchrun`` environment (and does nothing in a plain process); every rank walks
the same global batch order and trains on its own contiguous slice of each batch (``shard``);
the model is wrapped in ``DistributedDataParallel``; ``natgrad.KFAC`` notices the process group
and keeps the Kronecker factors identical on every rank by itself. At the end the ranks compare
their parameters, which follow one trajectory up to float rounding.

Run it from the repository root::

    torchrun --standalone --nproc_per_node=2 examples/distributed_train.py
    torchrun --standalone --nproc_per_node=2 examples/distributed_train.py --smoke
    python examples/distributed_train.py --smoke      # one process: the same code, no group

On CPU the processes talk over gloo; with ``--device cuda`` each uses ``cuda:LOCAL_RANK`` and
nccl. ``--save PATH`` writes the optimizer's ``state_dict`` from rank 0, which resumes on any
number of processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import natgrad
from natgrad.data import load_dataset
from natgrad.distributed import init_from_env, is_main, shard, shutdown
from natgrad.factors import STRATEGIES
from natgrad.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128,
                   help="the global batch; each rank trains on its slice")
    p.add_argument("--factors", choices=sorted(STRATEGIES), default="projected")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--save", type=Path, help="write the optimizer state_dict here (rank 0)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: 512 training and 256 test samples, one epoch")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    return args


def largest_difference_between_ranks(model: torch.nn.Module) -> float:
    """max |θ_rank − θ_0| over all parameters and ranks (0.0 in a single process)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if not dist.is_initialized():
        return 0.0
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = init_from_env(device=args.device)  # a no-op outside torchrun
    device = info.device
    if info.distributed and device.type == "cpu":
        torch.set_num_threads(1)  # the processes share the machine's cores

    train_set, test_set = load_dataset("mnist5k")
    epochs = args.epochs
    if args.smoke:
        train_set, test_set, epochs = train_set.subset(512), test_set.subset(256), 1
    X, Y = train_set.x.to(device), train_set.y.to(device)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = build_model("mlp", train_set.info).to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if info.distributed else net
    optimizer = natgrad.KFAC(model, lr=args.lr, factors=args.factors, seed=args.seed)
    if is_main():
        print(f"{info.world_size} process(es), backend {info.backend or 'none'}, "
              f"{args.factors} factors; global batch {args.batch_size}")

    generator = torch.Generator().manual_seed(args.seed)  # the same batch order on every rank
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(X), generator=generator).to(device)
        for start in range(0, len(X), args.batch_size):
            idx = order[start:start + args.batch_size]
            x, y = shard((X[idx], Y[idx]))  # this rank's contiguous slice of the global batch
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            net.eval()
            accuracy = (net(test_set.x.to(device)).argmax(1) == test_set.y.to(device))
            net.train()
        if is_main():
            print(f"epoch {epoch}: test accuracy {accuracy.float().mean().item():.4f}")

    difference = largest_difference_between_ranks(net)
    if is_main():
        print(f"largest parameter difference between ranks: {difference:.3g}")
        if args.save is not None:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save(optimizer.state_dict(), args.save)
            print(f"wrote {args.save}")
    shutdown()


if __name__ == "__main__":
    main()
