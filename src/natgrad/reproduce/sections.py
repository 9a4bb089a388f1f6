"""One markdown section of docs/RESULTS.md per part, from that part's JSON document (pure
functions). Figures are referenced by the paths stored in the documents, relative to RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .format import DASH, figure, md_table, num, pm, ratio


def _runs_by_optimizer(seed_docs: Sequence[Mapping[str, Any]]) -> dict[str, list[dict]]:
    """``[{"seed", "runs": [record, ...]}, ...]`` → ``{optimizer: [record per seed]}``."""
    out: dict[str, list[dict]] = {}
    for doc in seed_docs:
        for run in doc["runs"]:
            out.setdefault(run["optimizer"], []).append(run)
    return out


# ---- 1. parity ---------------------------------------------------------------------------------


def parity_md(doc: Mapping[str, Any]) -> str:
    """Final test accuracy (reconstruction loss for the autoencoder), mean ± std over seeds."""
    parts = []
    opts = doc["optimizers"]
    header = (f"Same epochs, seeds {', '.join(map(str, doc['seeds']))}, identical initial weights "
              f"and batch order per seed for every optimizer; default learning rates of the "
              f"registry. Mean ± sample standard deviation over seeds.")
    parts.append(header)
    if doc.get("missing"):
        parts.append(f"Not registered when this ran (no column): {', '.join(doc['missing'])}.")
    rows = []
    for model, m in doc["models"].items():
        if m.get("error"):
            rows.append([model, f"not available: {m['error']}", *([""] * (len(opts) - 1))])
            continue
        by_opt = _runs_by_optimizer(m["seed_runs"])
        reconstruct = m["metric"] == "test_loss"
        cells = []
        for o in opts:
            runs = by_opt.get(o, [])
            values = [r["test_loss"] if reconstruct else r["test_accuracy"] for r in runs]
            cell = pm(values, 1.0 if reconstruct else 100.0)
            diverged = sum(bool(r.get("diverged")) for r in runs)
            cells.append(cell + (f" ({diverged} diverged)" if diverged else ""))
        what = "recon. loss ↓" if reconstruct else "test acc. % ↑"
        rows.append([f"{model} ({m['epochs']} ep., {what})", *cells])
    parts.append(md_table(["model", *opts], rows))
    figs = [figure(f, f"{model}: {f.rsplit('/', 1)[-1]}") for model, m in doc["models"].items()
            for f in m.get("figures", [])]
    if figs:
        parts.append("Seed " + str(doc["seeds"][0]) + ", per epoch:\n\n" + "\n".join(figs))
    return "\n\n".join(parts)


# ---- 2. timing ---------------------------------------------------------------------------------


def timing_ratios(seed_runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """Per optimizer, lists over seeds: median step time (ms) and the ratios to SGD of the same
    compare run (same process and seed) of step time, wall time and time to target."""
    out: dict[str, dict[str, list]] = {}
    for doc in seed_runs:
        sgd = next((r for r in doc["runs"] if r["optimizer"] == "sgd"), None) or {}
        for r in doc["runs"]:
            o = out.setdefault(r["optimizer"], {k: [] for k in (
                "seed", "step_ms", "step_ratio", "wall_ratio", "time_to_target_s",
                "time_to_target_ratio")})
            step = r["step_time_s_median"]
            o["seed"].append(doc.get("seed"))
            o["step_ms"].append(None if step is None else 1e3 * step)
            o["step_ratio"].append(ratio(step, sgd.get("step_time_s_median")))
            o["wall_ratio"].append(ratio(r["wall_time_s"], sgd.get("wall_time_s")))
            o["time_to_target_s"].append(r["time_to_target_s"])
            o["time_to_target_ratio"].append(ratio(r["time_to_target_s"],
                                                   sgd.get("time_to_target_s")))
    return out


def timing_rows(seed_runs: Sequence[Mapping[str, Any]], reconstruct: bool) -> list[list[Any]]:
    """One table row per optimizer from :func:`timing_ratios` (mean ± std over seeds)."""
    rows = []
    ratios = timing_ratios(seed_runs)
    sgd_never = sum(t is None for t in ratios.get("sgd", {}).get("time_to_target_s", []))
    for opt, r in ratios.items():
        row = [opt, pm(r["step_ms"]), pm(r["step_ratio"], suffix="×"),
               pm(r["wall_ratio"], suffix="×")]
        if not reconstruct:
            never = sum(t is None for t in r["time_to_target_s"])
            cell = pm(r["time_to_target_ratio"], suffix="×")
            n = len(r["time_to_target_s"])
            if never:
                cell += f" (never in {never}/{n})"
            elif sgd_never:
                cell += f" (SGD never in {sgd_never}/{n})"
            row += [pm(r["time_to_target_s"]), cell]
        rows.append(row)
    return rows


def timing_md(doc: Mapping[str, Any]) -> str:
    """A table per model (ratios to SGD) and the wide-MLP step-time table."""
    parts = [
        "Ratios divide each optimizer's number by SGD's from the *same* `compare` run (same "
        "process, seed, initial weights and batch order), then average over seeds (mean ± std). "
        "Step time is the median over all steps (forward, backward, optimizer step, including "
        "the periodic curvature refreshes); wall time is total training time without evaluation; "
        f"time to target is training time until the test accuracy first reaches "
        f"{num(doc.get('target_accuracy', 0.9))} (checked once per epoch). Source: "
        f"{doc.get('source', 'the parity runs')}."
    ]
    for model, m in doc["models"].items():
        parts.append(f"**{model}**")
        if m.get("error"):
            parts.append(f"not available: {m['error']}")
            continue
        reconstruct = m["metric"] == "test_loss"
        headers = ["optimizer", "step ms", "step / SGD", "wall / SGD"]
        if not reconstruct:
            headers += ["to target s", "to target / SGD"]
        parts.append(md_table(headers, timing_rows(m["seed_runs"], reconstruct)))
    wide = doc.get("wide")
    if wide:
        reps = int(wide.get("repeats", 1))
        parts.append(f"**MLP 784-{wide['hidden'].replace(',', '-')}-10**, batch "
                     f"{wide['batch_size']}, {wide['steps']} steps, seed {wide['seed']}, one "
                     f"process" + (f"; the variants took turns {reps} times: median step time "
                                   f"of the {reps} runs, ratio mean ± std over the runs"
                                   if reps > 1 else "") + ":")
        if wide.get("error"):
            parts.append(f"not available: {wide['error']}")
        else:
            sgd = next((r for r in wide["runs"] if r["optimizer"] == "sgd"), None)

            def ratios(r: Mapping[str, Any]) -> list[float | None]:
                mine = r.get("step_time_s_runs", [r["step_time_s_median"]])
                base = (sgd.get("step_time_s_runs", [sgd["step_time_s_median"]])
                        if sgd else [None] * len(mine))
                return [ratio(a, b) for a, b in zip(mine, base)]

            rows = [[r["label"], r["options"], 1e3 * r["step_time_s_median"],
                     pm(ratios(r), suffix="×"), r["wall_time_s"], r["test_accuracy"]]
                    for r in wide["runs"]]
            parts.append(md_table(["variant", "options", "median step ms", "step / SGD",
                                   "wall s", "test acc."], rows, "llrrrr"))
            if wide.get("missing"):
                parts.append(f"Not registered when this ran: {', '.join(wide['missing'])}.")
    return "\n\n".join(parts)


# ---- 3. scaling --------------------------------------------------------------------------------


def scaling_md(doc: Mapping[str, Any]) -> str:
    """The ``bench scaling`` table (ms, MiB), slopes and the figure."""
    bench = doc["bench"]
    eigh = {r["width"]: r["update_time_s"] for r in bench["results"] if r["strategy"] == "eigh"}
    rows = []
    for r in bench["results"]:
        label = r["strategy"] if r["rank"] is None else f"{r['strategy']} r={r['rank']}"
        ref = eigh.get(r["width"])
        rows.append([label, r["width"], 1e3 * r["update_time_s"],
                     1e3 * r["amortized_update_time_s"] if "amortized_update_time_s" in r
                     else None,
                     1e3 * r["precondition_time_s"], r["state_bytes"] / 2**20,
                     ratio(ref, r["update_time_s"])])
    cfg = bench["config"]
    parts = [
        f"One square layer (both Kronecker factors d × d), batch statistics of {cfg['batch']} "
        f"rows, {cfg['dtype']}, {cfg['threads']} threads; medians of up to {cfg['repeats']} "
        "interleaved repeats. *update*: one factor from new statistics to a ready-to-apply "
        "inverse; *amortized*: including the recursive strategy's periodic exact refresh; "
        "*precond*: one d × d gradient through both factors; *state*: one factor's optimizer "
        "state.",
        md_table(["strategy", "width", "update ms", "amortized ms", "precond ms", "state MiB",
                  "eigh / this"], rows),
        "Log-log slopes of update time against width: " + ", ".join(
            f"{k} {num(v)}" for k, v in bench["slopes"].items()) + ".",
    ]
    if doc.get("figure"):
        parts.append(figure(doc["figure"], "update and preconditioning time vs width"))
    return "\n\n".join(parts)


# ---- 4. stability ------------------------------------------------------------------------------


def stability_md(doc: Mapping[str, Any]) -> str:
    """Diverged runs per optimizer × damping, and the mean test accuracy of the others."""
    bench = doc["bench"]
    dampings = sorted({r["damping"] for r in bench["results"]}, reverse=True)
    opts = list(dict.fromkeys(r["optimizer"] for r in bench["results"]))
    div_rows, acc_rows = [], []
    for o in opts:
        div, acc = [o], [o]
        total = [0, 0]
        for d in dampings:
            rs = [r for r in bench["results"] if r["optimizer"] == o and r["damping"] == d]
            k = sum(bool(r["diverged"]) for r in rs)
            total[0] += k
            total[1] += len(rs)
            div.append(f"{k}/{len(rs)}" if rs else DASH)
            acc.append(pm([r["test_accuracy"] for r in rs if not r["diverged"]], 100.0))
        div.append(f"{total[0]}/{total[1]}")
        div_rows.append(div)
        acc_rows.append(acc)
    cfg = bench["config"]
    heads = [f"λ={d:g}" for d in dampings]
    return "\n\n".join([
        f"MLP 784-{'-'.join(map(str, cfg.get('hidden', [])))}-10 on "
        f"{cfg.get('data', 'mnist5k')} ({cfg.get('train_size', '?')} training samples), "
        f"float32 factors, {cfg['epochs']} epoch(s), lr {num(cfg['lr'])}, seeds "
        f"{', '.join(map(str, cfg['seeds']))}. A run diverged when its loss or parameters "
        f"became non-finite or its final training loss exceeds {num(cfg['divergence_factor'])}"
        "× the initial one.",
        "Diverged runs:",
        md_table(["optimizer", *heads, "total"], div_rows),
        "Test accuracy (%) of the runs that did not diverge:",
        md_table(["optimizer", *heads], acc_rows),
    ])


# ---- 5. analysis -------------------------------------------------------------------------------


def analysis_md(doc: Mapping[str, Any]) -> str:
    """The per-layer table, global numbers, figures, and the tracked curvature."""
    parts = []
    rep = doc.get("report")
    if doc.get("analyze_error"):
        parts.append(f"`natgrad analyze` not available: {doc['analyze_error']}")
    if rep:
        keys = list(rep.get("approximations", {}))
        parts.append(
            f"A {rep['model']} trained with {doc.get('trained_with', 'sgd')} for "
            f"{doc.get('epochs', '?')} epoch(s) (test accuracy "
            f"{num(doc.get('test_accuracy'))}), analysed on {rep['samples']} training samples "
            f"({rep['fisher']} Fisher, {rep['params']:,} parameters). Relative errors are "
            "‖(F − F̃)v‖ / ‖Fv‖ over random probes, per layer block.")
        rows = [[row["name"], row["kind"], row["params"], row["trace"], row["top_eigenvalue"],
                 *(row.get(f"{k}_relative_error") for k in keys)] for row in rep["layers"]]
        parts.append(md_table(["layer", "kind", "params", "trace", "top eigenvalue",
                               *(f"{k} rel. error" for k in keys)], rows,
                              "llrrr" + "r" * len(keys)))
        lines = [f"- trace {num(rep['trace']['value'])} (exact); top-{len(rep['top_eigenvalues'])}"
                 f" eigenvalues {', '.join(num(v) for v in rep['top_eigenvalues'])} (largest "
                 f"relative residual {num(max(rep['top_residuals']), 2)})"]
        if rep.get("logdet"):
            ld, ed = rep["logdet"], rep["effective_dimension"]
            lines.append(f"- log det(F + {num(rep['damping'])} I) {num(ld['value'])} ± "
                         f"{num(ld.get('error', ld['stderr']), 2)}; effective dimension "
                         f"{num(ed['value'])} ± {num(ed.get('error', ed['stderr']), 2)} "
                         "(error bars: probe spread plus the quadrature error)")
        for k, a in rep.get("approximations", {}).items():
            e = a["relative_error"]
            lines.append(f"- {k}, whole network: relative error {num(e['value'])} ± "
                         f"{num(e['stderr'], 2)}, top-k eigenspace overlap "
                         f"{num(a.get('top_k_overlap'))}")
        if rep.get("coupling"):
            c = rep["coupling"]
            lines.append(f"- cross-layer coupling (share of ‖Fv‖² outside the diagonal blocks) "
                         f"{num(c['value'])} ± {num(c['stderr'], 2)}")
        parts.append("\n".join(lines))
        figs = [figure(f, f.rsplit("/", 1)[-1]) for f in doc.get("figures", [])]
        if figs:
            parts.append("\n".join(figs))
    track = doc.get("tracking")
    parts.append("**Curvature during training**")
    if not track or track.get("error"):
        parts.append(f"not available: {(track or {}).get('error', 'not run')}")
    else:
        parts.append(f"Exact-Fisher trace and largest eigenvalue on {track['samples']} fixed "
                     f"training samples after each epoch ({track['source']}).")
        opts = list(track["runs"])
        epochs = sorted({r["epoch"] for rs in track["runs"].values() for r in rs})
        rows = []
        for e in epochs:
            row: list[Any] = [str(e)]
            for o in opts:
                rec = next((r for r in track["runs"][o] if r["epoch"] == e), {})
                row += [rec.get("trace"), rec.get("top_eigenvalue")]
            rows.append(row)
        heads = [h for o in opts for h in (f"{o} trace", f"{o} λ_max")]
        parts.append(md_table(["epoch", *heads], rows))
        if track.get("figure"):
            parts.append(figure(track["figure"], "Fisher trace and top eigenvalue per epoch"))
    return "\n\n".join(parts)


# ---- 6. model families -------------------------------------------------------------------------


def families_md(doc: Mapping[str, Any]) -> str:
    """The ResNet and transformer tables: accuracy as in the parity part, the fraction of
    parameters each optimizer preconditions, and step / wall time as ratios to SGD."""
    data = ", ".join(f"{model} on {m['data']}" for model, m in doc["models"].items())
    parts = [f"Whole networks: {data}. " + parity_md(doc)]
    opts = doc["optimizers"]
    rows = []
    for model, m in doc["models"].items():
        frac = m.get("preconditioned", {})
        rows.append([f"{model} ({m.get('num_params', 0):,} params)",
                     *(DASH if frac.get(o) is None else f"{100 * frac[o]:.1f} %" for o in opts)])
    parts.append("Share of the parameters that take the natural-gradient step (the others, "
                 "e.g. attention's fused layers if any, take the plain step of the optimizer):")
    parts.append(md_table(["model", *opts], rows))
    for model, m in doc["models"].items():
        parts.append(f"**{model}**, wall time of the training runs above over SGD's (mean ± std "
                     "over seeds; step times measured with the optimizers taking turns are in "
                     "the next part):")
        walls = timing_ratios(m["seed_runs"])
        parts.append(md_table(["optimizer", "wall / SGD"],
                              [[o, pm(walls.get(o, {}).get("wall_ratio", []), suffix="×")]
                               for o in opts]))
    return "\n\n".join(parts)


def steps_md(doc: Mapping[str, Any]) -> str:
    """One table per model: median step time and the median per-round ratio to SGD."""
    parts = ["Every optimizer trains its own copy of the same initial model on the same batches; "
             "in every round each takes one step (forward, backward, `step()`, curvature steps "
             "included at their share of the rounds), the order rotating from round to round. "
             "Ratio: the median over rounds of the step time over SGD's in the same round "
             "(interquartile range in brackets), so a load that drifts over minutes on a shared "
             "machine cancels out. `natgrad bench steps --model NAME` measures one model."]
    for model, m in doc["models"].items():
        cfg = m["config"]
        rows = [[r["optimizer"], 1e3 * r["step_time_s_median"],
                 f"{num(r['ratio_median'])}× ({num(r['ratio_quartiles'][0])}–"
                 f"{num(r['ratio_quartiles'][1])})"] for r in m["runs"]]
        parts.append(f"**{model}** on {cfg['data']}, batch {cfg['batch_size']}, {m['rounds']} "
                     f"rounds, {cfg['threads']} thread(s):")
        parts.append(md_table(["optimizer", "step ms", "step / SGD"], rows))
    return "\n\n".join(parts)


# ---- 7. convergence ----------------------------------------------------------------------------


def _grid_cell(lr: str, accuracy: float, chosen: bool) -> str:
    text = f"{lr}: " + ("*diverged*" if accuracy < 0 else num(100 * accuracy))
    return f"**{text}**" if chosen else text


def convergence_md(doc: Mapping[str, Any]) -> str:
    """Per model: each optimizer's validation-chosen learning rate, then the long runs' final
    test accuracy / loss and wall time (mean ± std over seeds); the learning-rate grid."""
    parts = [
        f"Each optimizer's learning rate is picked from a grid by the accuracy on a validation "
        f"split of {doc['validation']} training samples after {doc['grid_epochs']} epochs "
        f"(seed 0; the test set is not looked at); then {doc['epochs']} epochs with one "
        f"{doc['schedule']} schedule for every optimizer, seeds "
        f"{', '.join(map(str, doc['seeds']))}. Mean ± sample standard deviation over seeds."]
    for model, m in doc["models"].items():
        by_opt = _runs_by_optimizer(m["seed_runs"])
        sgd_wall = {r["seed"]: next((x["wall_time_s"] for x in r["runs"]
                                     if x["optimizer"] == "sgd"), None) for r in m["seed_runs"]}
        rows = []
        for opt, runs in by_opt.items():
            walls = [ratio(x["wall_time_s"], sgd_wall.get(s["seed"]))
                     for s in m["seed_runs"] for x in s["runs"] if x["optimizer"] == opt]
            diverged = sum(bool(r.get("diverged")) for r in runs)
            rows.append([opt, num(m["chosen_lr"].get(opt)),
                         pm([r["test_accuracy"] for r in runs], 100.0)
                         + (f" ({diverged} diverged)" if diverged else ""),
                         pm([r["test_loss"] for r in runs]),
                         pm([r["wall_time_s"] for r in runs]), pm(walls, suffix="×")])
        parts.append(f"**{model}** on {m['data']}:")
        parts.append(md_table(["optimizer", "lr", "test acc. %", "test loss", "wall s",
                               "wall / SGD"], rows))
        grid = m["grid_validation_accuracy"]
        parts.append("Validation accuracy (%) per learning rate of the grid, the chosen one in "
                     "bold (*diverged* marks a diverged run):")
        parts.append(md_table(["optimizer", "lr: validation acc. %"], [
            [o, " · ".join(_grid_cell(lr, acc, float(lr) == m["chosen_lr"].get(o))
                           for lr, acc in sorted(g.items(), key=lambda kv: float(kv[0])))]
            for o, g in grid.items()], "ll"))
    return "\n\n".join(parts)
