"""A race's ratios at other targets: the same curves (``race.json`` of ``natgrad race`` or of
``benchmarks/race_given_tuning.py``, or ``docs/results/race.json``'s model), scored by
:func:`natgrad.bench.race.summarize` at each given validation loss instead of tuned AdamW's
final one — how the verdict depends on where the target sits on the curves.

    PYTHONPATH=src python benchmarks/race_targets.py docs/results/race.json 2.0,1.8,1.7,1.65
    PYTHONPATH=src python benchmarks/race_targets.py docs/results/race.json 0.1,0.066 \\
        --model resnet8 --per-seed adamw,sgd

``--per-seed`` adds, per seed, each optimizer's own time to the target against the named
optimizers' (their time over its; "never" where it did not get there, "-" where they did not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from natgrad.bench.race import RaceConfig, summarize, to_target


def cell(d: dict) -> str:
    if d["mean"] is None:
        return "never" if d["n"] else "-"
    return f"{d['mean']:.4g} [{d['min']:.4g}, {d['max']:.4g}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("targets", help="comma list of validation losses")
    p.add_argument("--model", default="gpt", help="the model, for docs/results/race.json")
    p.add_argument("--per-seed", default="", metavar="R1,R2",
                   help="per-seed time ratios against these optimizers")
    a = p.parse_args()
    per_seed = [r for r in a.per_seed.split(",") if r]
    doc = json.loads(Path(a.json).read_text())
    doc = doc.get("models", {}).get(a.model, doc)
    cfg = RaceConfig(**{**doc["config"], "hidden": None if doc["config"]["hidden"] is None
                        else tuple(doc["config"]["hidden"]),
                        "optimizers": tuple(doc["config"]["optimizers"]),
                        "seeds": tuple(doc["config"]["seeds"])})
    seeds = {int(s): v for s, v in doc["seeds"].items()}
    print(f"{len(seeds)} seeds; mean [min, max] over seeds")
    for target in (float(t) for t in a.targets.split(",")):
        summ = summarize(cfg, seeds, target=target)
        print(f"target {target:g}")
        for name, r in summ["optimizers"].items():
            refs = "  ".join(f"x {k.split('_')[2]} {cell(r[k])}" for k in r
                             if k.startswith("speedup_vs_") and k.endswith("_time"))
            print(f"  {name:12s} {r['reached']}/{r['steps_to_target']['n']}  steps "
                  f"{cell(r['steps_to_target']):24s} own s {cell(r['own_s_to_target']):24s} "
                  f"{refs}")
            if per_seed and name not in per_seed:
                print(f"  {'':12s} per seed: {per_seed_ratios(seeds, name, per_seed, target)}")


def per_seed_ratios(seeds: dict, name: str, refs: list[str], target: float) -> str:
    """``s<seed>: × <ref> <ratio>`` for each seed and reference: the reference's own time to
    ``target`` over ``name``'s."""
    out = []
    for seed, runs in seeds.items():
        own = to_target(runs[name]["curve"], target)[1]
        cells = []
        for ref in refs:
            theirs = to_target(runs[ref]["curve"], target)[1]
            cells.append(f"x {ref} " + ("never" if own is None else "-" if theirs is None
                                        else f"{theirs / own:.2f}"))
        out.append(f"s{seed}: " + ", ".join(cells))
    return " | ".join(out)


if __name__ == "__main__":
    main()
