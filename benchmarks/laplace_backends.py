"""Kronecker (and diagonal) Laplace fits side by side: natgrad vs laplace-torch's own backends.

    PYTHONPATH=src python benchmarks/laplace_backends.py             # MLP and CNN, 1000 samples
    PYTHONPATH=src python benchmarks/laplace_backends.py --models cnn --structures kron

Times ``Laplace(model, "classification", subset_of_weights="all", hessian_structure=s,
backend=B).fit(loader)`` on the embedded MNIST sample for natgrad's ``NatgradGGN``,
laplace-torch's ``CurvlinopsGGN`` and ``BackPackGGN``, interleaved within each repeat (one
process, one thread), and prints the median and the largest relative difference of the posterior
precision to natgrad's. Needs laplace-torch (docs/guide/inverse.md). On a shared machine only the
ratios within one run mean anything: report ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from natgrad.data import load_dataset
from natgrad.models import build_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--structures", nargs="+", default=["kron", "diag"], choices=["kron", "diag"])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from laplace import Laplace
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    from natgrad.integrations.laplace import NatgradGGN

    backends = {"natgrad": NatgradGGN, "curvlinops": CurvlinopsGGN, "backpack": BackPackGGN}
    train_set, _ = load_dataset("mnist5k")
    train_set = train_set.subset(a.samples)
    loader = torch.utils.data.DataLoader(train_set, batch_size=a.batch_size)
    print(f"load average {os.getloadavg()}; {a.samples} samples, batches of {a.batch_size}")
    for name in a.models:
        torch.manual_seed(0)
        model = build_model(name, train_set.info, (256, 128) if name == "mlp" else None)
        model.eval()
        for structure in a.structures:
            times: dict[str, list[float]] = {b: [] for b in backends}
            precision: dict[str, torch.Tensor] = {}
            for _ in range(a.repeats):
                for label, backend in backends.items():
                    la = Laplace(copy.deepcopy(model), "classification", subset_of_weights="all",
                                 hessian_structure=structure, backend=backend)
                    start = time.perf_counter()
                    try:
                        la.fit(loader)
                    except Exception as exc:  # a backend that cannot serve this structure
                        times[label].append(float("nan"))
                        print(f"  {label}: {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    times[label].append(time.perf_counter() - start)
                    H = la.H_facs if structure == "kron" else la.H
                    precision[label] = H.diag() if structure == "kron" else H
            for label in backends:
                diff = ""
                if label in precision and "natgrad" in precision:
                    ref = precision["natgrad"]
                    err = float((precision[label] - ref).abs().max() / ref.abs().max())
                    diff = f"  max rel. diff. of diag(H) to natgrad {err:.1e}"
                print(f"{name:4s} {structure:5s} {label:10s} median "
                      f"{statistics.median(times[label]):7.2f} s{diff}")


if __name__ == "__main__":
    main()
