"""The ``race`` part of ``natgrad reproduce``: :func:`natgrad.bench.race.run_race` (what
``natgrad race`` runs) on the character GPT and on the ResNet, its markdown section and its
run-time estimate."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..bench.race import format_setting, reference_columns
from .context import Context, available_optimizers
from .format import figure, md_table, num

#: optimizers raced per model (those not registered, or whose package is missing, are listed as
#: missing). Muon is left out on the ResNet: torch's Muon takes 2-D matrices and ResNet-8's
#: hidden layers are convolutions. PSGD-Kron (``kron``) is left out by default: pytorch-optimizer
#: 4.1's first Kron step on the GPT did not finish in 100 s on the 2-core reference machine.
RACE_OPTIMIZERS = {
    "gpt": ("adamw", "muon", "soap", "shampoo", "pkfac", "pkfac+adamw", "eigenadam"),
    "resnet8": ("sgd", "adamw", "soap", "shampoo", "pkfac", "pkfac+adamw", "eigenadam"),
}
#: per-model settings beside the mode's (batch, evaluation samples)
RACE_SETUP = {"gpt": {"batch": 32, "eval_samples": 512},
              "resnet8": {"batch": 128, "eval_samples": 400}}
#: optimizers that need the optional pytorch-optimizer package (natgrad[peers])
NEEDS_PEERS = ("soap", "shampoo", "kron")
#: seconds of one optimizer step of each model with 1 thread on the 2-core reference machine
#: (GPT batch 32 × 64 characters; ResNet-8 batch 128), an average over the raced optimizers
STEP_COST_S = {"gpt": 0.15, "resnet8": 0.3}


def race_optimizers(model: str, mode: str = "full") -> tuple[list[str], list[str]]:
    """``(raced, missing)`` for ``model``: registered, and their package importable (in the
    tiny mode only those of the smoke race)."""
    names, missing = available_optimizers(RACE_OPTIMIZERS[model])
    if importlib.util.find_spec("pytorch_optimizer") is None:
        missing += [n for n in names if n in NEEDS_PEERS]
        names = [n for n in names if n not in NEEDS_PEERS]
    if mode == "tiny":
        from ..bench.race import SMOKE

        names = [n for n in names if n in SMOKE.optimizers]
    return names, missing


def race_config(s: Any, model: str) -> Any:
    """The :class:`~natgrad.bench.race.RaceConfig` of ``model`` in the mode ``s``."""
    from ..bench.race import SMOKE, RaceConfig

    names, _ = race_optimizers(model, s.mode)
    if s.mode == "tiny":  # the smoke race's optimizers: seconds
        return RaceConfig(**{**asdict(SMOKE), "model": model, "optimizers": tuple(names),
                             "hidden": SMOKE.hidden if model == "gpt" else None,
                             "batch": 8 if model != "gpt" else SMOKE.batch})
    return RaceConfig(model=model, optimizers=tuple(names), steps=s.race_steps[model],
                      trials=s.race_trials, tune_steps=s.race_tune_steps[model],
                      seeds=s.seeds, eval_every=s.race_eval_every, threads=1,
                      **RACE_SETUP[model])


def run_race(ctx: Context) -> dict[str, Any]:
    """Each model's race; ``{"models": {model: race.json's document + "missing"}}``."""
    from ..bench.race import format_race
    from ..bench.race import run_race as race

    s = ctx.settings
    doc: dict[str, Any] = {"models": {}}
    for model in s.race_models:
        cfg = race_config(s, model)
        ctx.note(f"race: {model}, {', '.join(cfg.optimizers)}")
        out = ctx.work / "race" / model
        res = race(cfg, out, log=ctx.log,
                   command=f"natgrad reproduce{'' if s.mode == 'full' else ' --' + s.mode} "
                           "--only race")
        ctx.log(format_race(res))
        res["missing"] = race_optimizers(model, s.mode)[1]
        res["figure"] = ctx.figure(out / "race.png", f"race-{model}.png")
        res.pop("figures", None)
        doc["models"][model] = res
    return doc


def _cell(d: Mapping[str, Any] | None, digits: int = 3) -> str:
    if d is None:
        return "–"
    if d["mean"] is None:
        return "never"
    return f"{num(d['mean'], digits)} [{num(d['min'], digits)}, {num(d['max'], digits)}]"


def race_md(doc: Mapping[str, Any]) -> str:
    """Per model: the protocol in one paragraph, the table (mean over seeds [min, max]) and the
    figure of validation loss against own time."""
    parts = []
    for model, res in doc["models"].items():
        cfg, summ = res["config"], res["summary"]
        parts.append(
            f"**{model}** on {res['data']} ({res['parameters']:,} parameters): every optimizer "
            f"tuned with {cfg['trials']} trials of {cfg['tune_steps']} steps (its sourced "
            f"default first), then {cfg['steps']} steps × batch {cfg['batch']} for seeds "
            f"{', '.join(map(str, cfg['seeds']))}, the optimizers taking turns step by step, "
            f"{cfg['threads']} thread; validation every {cfg['eval_every']} steps on "
            f"{cfg['eval_samples']} samples. Target validation loss {num(summ['target'], 4)} "
            f"({summ['target_source']}). "
            + ("*× AdamW*, *× Muon*: AdamW's (Muon's)" if len(reference_columns(summ)) > 1
               else "*× AdamW*: AdamW's")
            + " own time to the target over this optimizer's, per seed (above 1: sooner). "
            "*clip bound*: share of natgrad's steps "
            f"whose KL-clip set the step length. Load average at the end "
            f"{res['load_average_end']}."
            + (f" Not raced (missing): {', '.join(res['missing'])}." if res.get("missing")
               else ""))
        refs = reference_columns(summ)
        rows = []
        for name, r in summ["optimizers"].items():
            picked = format_setting(res["tuning"][name]["picked"])
            clip = r["clip_bound_fraction"]
            rows.append([name, picked, f"{r['reached']}/{r['steps_to_target']['n']}",
                         _cell(r["steps_to_target"]), _cell(r["own_s_to_target"]),
                         *(_cell(r[key]) for key in refs.values()),
                         _cell(r["final_validation_loss"], 4), _cell(r["final_test_loss"], 4),
                         _cell(r["step_ms"]),
                         "–" if clip is None else f"{num(100 * clip['mean'])} %"])
        parts.append(md_table(["optimizer", "picked", "reached", "steps to target",
                               "own s to target", *refs, "final val. loss",
                               "final test loss", "ms / step", "clip bound"], rows,
                              "ll" + "r" * (7 + len(refs))))
        if res.get("figure"):
            parts.append(figure(res["figure"], f"{model}: validation loss against own time"))
    return "\n\n".join(parts)


def estimate_race(s: Any) -> float:
    """Seconds of the part on the reference machine: tuning plus the raced steps, all optimizers,
    plus a tenth for evaluations."""
    total = 0.0
    for model in s.race_models:
        n = len(RACE_OPTIMIZERS[model])
        if s.mode == "tiny":
            total += 20.0
            continue
        steps = s.race_trials * s.race_tune_steps[model] + len(s.seeds) * s.race_steps[model]
        total += 1.1 * n * steps * STEP_COST_S[model]
    return total
