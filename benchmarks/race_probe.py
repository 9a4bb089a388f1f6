"""A quick look before a race: registry optimizers on ``natgrad race``'s task (default the
character GPT on shakespeare_char, batch 32 × 64; ``--model resnet8`` the image race), taking
turns step by step in one process, one thread, one seed; validation loss (512 samples) and own
ms per step every 50 steps.

    PYTHONPATH=src python benchmarks/race_probe.py 150 "muon:lr=0.05" "eigenadam:lr=3e-3" \\
        "eigenadam:lr=3e-3,betas=(0.9,0.99)" "eigenadam:lr=3e-3,fisher='empirical'"

Each spec is ``registry name:keyword arguments`` (Python syntax, passed to the optimizer's
factory; ``ramp(early, late, switch)`` is the schedule ``step -> early if step < switch else
late``, e.g. ``inverse_every=ramp(10, 25, 200)``). Only ratios within one run mean anything on a
shared machine.
"""

from __future__ import annotations

import argparse
import ast
import warnings

import torch

from natgrad.bench.race import RaceConfig, Runner, load_task


class Ramp:
    """The schedule ``step -> early if step < switch else late``."""

    def __init__(self, early: int, late: int, switch: int) -> None:
        self.early, self.late, self.switch = early, late, switch

    def __call__(self, step: int) -> int:
        return self.early if step < self.switch else self.late


def parse(spec: str) -> tuple[str, dict]:
    """``"name:k=v,k2=v2"`` → ``(name, {k: v, ...})`` (values are Python literals, ``dict(...)``
    and ``ramp(early, late, switch)`` allowed)."""
    name, _, rest = spec.partition(":")
    kw = {}
    if rest:
        call = ast.parse(f"f({rest})", mode="eval").body
        for k in call.keywords:
            v = k.value
            if isinstance(v, ast.Call) and getattr(v.func, "id", "") == "dict":
                kw[k.arg] = {kk.arg: ast.literal_eval(kk.value) for kk in v.keywords}
            elif isinstance(v, ast.Call) and getattr(v.func, "id", "") == "ramp":
                kw[k.arg] = Ramp(*(ast.literal_eval(a) for a in v.args))
            else:
                kw[k.arg] = ast.literal_eval(v)
    return name, kw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", type=int)
    p.add_argument("specs", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="gpt", help="registry model (default gpt)")
    p.add_argument("--batch", type=int, default=32, help="samples per step (default 32)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = load_task(RaceConfig(model=a.model, optimizers=("adamw",), steps=a.steps,
                                batch=a.batch))
    runs = {s: Runner(task, *parse(s), a.seed) for s in a.specs}
    for k in range(1, a.steps + 1):
        for r in runs.values():
            r.step()
        if k % 50 == 0 or k == a.steps:
            print(k, flush=True)
            for s, r in runs.items():
                val = task.evaluate(r.model, task.validation, 512)
                print(f"   {s:70s} {val:.4f} {1e3 * r.own_s / r.steps:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
