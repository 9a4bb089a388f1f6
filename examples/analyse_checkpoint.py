"""Analyse the Fisher of a trained model, matrix-free, with ``natgrad.fisher``.

What it shows: a checkpoint written by ``natgrad.models.save_checkpoint`` (or by
``natgrad compare --save-model PATH``) rebuilt with ``natgrad.models.load_checkpoint``, then

* the exact trace of the exact (type-2) Fisher, ``exact_trace``;
* its top eigenvalues by Lanczos, ``lanczos_topk``, with their relative residuals;
* K-FAC built from the same data, ``KFACOperator.from_data``: its trace and top eigenvalues in
  closed form, and how well it approximates the Fisher, ``relative_error`` (‖(F − K)v‖ / ‖Fv‖ on
  random probes) and ``subspace_overlap`` of the top eigenvectors.

No matrix of size parameters² is ever formed. Run it from the repository root::

    python examples/analyse_checkpoint.py --checkpoint runs/model-sgd.pt
    python examples/analyse_checkpoint.py            # trains the MLP for one epoch first
    python examples/analyse_checkpoint.py --smoke    # a few seconds: tiny training and analysis

(``natgrad compare --optimizers sgd --save-model runs/model.pt`` writes ``runs/model-sgd.pt``.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from natgrad.data import load_dataset
from natgrad.fisher import (
    ExactFisher,
    KFACOperator,
    exact_trace,
    kfac_top_eigenvalues,
    kfac_trace,
    lanczos_topk,
    relative_error,
    subspace_overlap,
)
from natgrad.models import build_model, load_checkpoint, loss_kind, save_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path,
                   help="a file from natgrad.models.save_checkpoint (default: train one)")
    p.add_argument("--samples", type=int, default=512,
                   help="training samples the Fisher is taken over")
    p.add_argument("-k", "--top-k", type=int, default=5, help="eigenvalues to compute")
    p.add_argument("--probes", type=int, default=10,
                   help="random probes for the K-FAC relative error")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: a 784-32-10 MLP trained on 512 samples (without "
                        "--checkpoint); the Fisher over 64 samples, k = 3, 4 probes")
    args = p.parse_args(argv)
    for name in ("samples", "top_k", "probes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.smoke:
        args.samples, args.top_k, args.probes = min(args.samples, 64), min(args.top_k, 3), 4
    return args


def train_checkpoint(path: Path, smoke: bool) -> Path:
    """One epoch of SGD on the embedded MNIST sample, saved with ``save_checkpoint``."""
    train_set, _ = load_dataset("mnist5k")
    hidden = None  # the default widths, 784-256-128-10
    if smoke:
        train_set, hidden = train_set.subset(512), (32,)
    torch.manual_seed(0)
    model = build_model("mlp", train_set.info, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(path, model, "mlp", train_set.info, hidden, optimizer="sgd")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or train_checkpoint(Path(tmp) / "mlp-sgd.pt", args.smoke)
        try:
            model, ckpt = load_checkpoint(path)
        except Exception as exc:  # any file that save_checkpoint did not write
            raise SystemExit(f"{path}: not a checkpoint written by natgrad.models.save_checkpoint"
                             f" ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    loss = loss_kind(ckpt["model"])
    train_set, _ = load_dataset(ckpt["dataset"])
    n = min(args.samples, len(train_set))
    X = train_set.x[:n]
    model.eval()  # the analysis is of the deterministic network
    params = sum(p.numel() for p in model.parameters())
    print(f"{path.name}: {ckpt['model']} with {params:,} parameters, Fisher over {n} "
          f"{ckpt['dataset']} samples, loss {loss}")

    fisher = ExactFisher(model, (X,), loss)
    trace = exact_trace(fisher).value
    top = lanczos_topk(fisher, k=args.top_k)
    print(f"exact Fisher: trace {trace:.5g}; top-{args.top_k} eigenvalues "
          + ", ".join(f"{v:.4g}" for v in top.values.tolist())
          + f" (largest relative residual {top.residuals.max().item():.1e}, {top.steps} products)")

    kfac = KFACOperator.from_data(model, (X,), loss, fisher="exact")
    error = relative_error(fisher, kfac, probes=args.probes)
    kfac_top = lanczos_topk(kfac, k=args.top_k)
    overlap = subspace_overlap(top.vectors, kfac_top.vectors)
    print(f"K-FAC: trace {kfac_trace(kfac):.5g}; top-{args.top_k} eigenvalues "
          + ", ".join(f"{v:.4g}" for v in kfac_top_eigenvalues(kfac, args.top_k).tolist()))
    print(f"K-FAC relative error ‖(F − K)v‖/‖Fv‖ = {error.value:.3f} ± {error.stderr:.2g} over "
          f"{args.probes} probes; top-{args.top_k} eigenspace overlap {overlap:.3f}")
    return {"trace": trace, "top_eigenvalue": top.values[0].item(),
            "kfac_relative_error": error.value, "overlap": overlap}


if __name__ == "__main__":
    main()
