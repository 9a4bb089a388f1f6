"""``natgrad race`` with the tuning taken from a previous race's log instead of run again: the
same race (turns, own time, target, summary, JSON and plot, :mod:`natgrad.bench.race`), for a
shorter or different raced horizon on a machine where tuning twice does not fit. The picked
settings and the trial scores are read from the ``tune …`` / ``… picked …`` lines that
``natgrad race`` printed; the JSON is written after every seed (``race.json`` holds the seeds
done so far).

    PYTHONPATH=src python benchmarks/race_given_tuning.py run1.log --steps 400 --eval-every 25 \\
        --seeds 0,1,2 --optimizers adamw,muon,pkfac,eigenadam --out docs/results/race_gpt
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from natgrad.bench.race import RaceConfig, format_race, load_task, plot_race, race_seed, summarize
from natgrad.models import default_dataset
from natgrad.report import load_average, optional_figures, write_json


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _setting(text: str) -> dict[str, float | str]:
    return {k: _value(v) for k, v in (part.strip().split(" ", 1) for part in text.split(","))}


def parse_tuning(log: str) -> dict[str, dict]:
    """``{name: {"trials": [{"setting", "validation_loss"}], "picked": setting}}`` from a race
    log (the settings as printed, 3 significant digits)."""
    tuning: dict[str, dict] = {}
    for line in log.splitlines():
        m = re.match(r"\s+tune (\S+) (.*): validation loss (\S+)$", line)
        if m:
            score = float(m.group(3))
            tuning.setdefault(m.group(1), {"trials": []})["trials"].append(
                {"setting": _setting(m.group(2)),
                 "validation_loss": score if math.isfinite(score) else math.inf})
        m = re.match(r"(\S+): picked (.*)$", line)
        if m:
            tuning[m.group(1)]["picked"] = _setting(m.group(2))
    return tuning


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--optimizers", required=True)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--tune-steps", type=int, default=150)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    names = tuple(a.optimizers.split(","))
    cfg = RaceConfig(optimizers=names, steps=a.steps, trials=a.trials, tune_steps=a.tune_steps,
                     seeds=tuple(int(s) for s in a.seeds.split(",")), eval_every=a.eval_every,
                     threads=1)
    tuning = parse_tuning(Path(a.log).read_text())
    missing = [n for n in names if "picked" not in tuning.get(n, {})]
    if missing:
        raise SystemExit(f"no picked setting for {missing} in {a.log}")
    torch.set_num_threads(1)
    task = load_task(cfg)
    picked = {n: tuning[n]["picked"] for n in names}
    out = Path(a.out)
    seeds: dict[int, dict] = {}
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        print(f"race, seed {seed}", flush=True)
        seeds[seed] = race_seed(task, picked, seed)
        doc = {"config": asdict(cfg), "command": "python benchmarks/race_given_tuning.py "
               f"(tuning from {Path(a.log).name})", "parameters":
               sum(p.numel() for p in task.build(0).parameters()),
               "data": default_dataset(cfg.model), "train_samples": len(task.train[0]),
               "load_average_end": load_average(), "wall_s": time.perf_counter() - t0,
               "tuning": {n: tuning[n] for n in names},
               "seeds": {str(s): v for s, v in seeds.items()},
               "summary": summarize(cfg, seeds)}
        write_json(out / "race.json", doc)
        print(format_race(doc), flush=True)
    optional_figures(plot_race, doc, out / "race.png")


if __name__ == "__main__":
    main()
