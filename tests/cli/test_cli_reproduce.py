"""``natgrad reproduce``: markdown from synthetic JSON, part selection, a tiny parity run."""

from __future__ import annotations

import json

import pytest
import torch

from natgrad.cli.main import main
from natgrad.reproduce import PART_TITLES, PARTS
from natgrad.reproduce.markdown import (
    md_table,
    mean_std,
    num,
    parity_md,
    pm,
    results_md,
    stability_md,
    timing_md,
    timing_ratios,
)


def _run(opt, acc, loss, step, wall, ttt):
    return {"optimizer": opt, "test_accuracy": acc, "test_loss": loss, "step_time_s_median": step,
            "wall_time_s": wall, "time_to_target_s": ttt, "diverged": False}


SEED_RUNS = [
    {"seed": 0, "runs": [_run("sgd", 0.90, 0.3, 0.010, 1.0, 2.0),
                         _run("kfac", 0.95, 0.2, 0.030, 3.0, 1.0)]},
    {"seed": 1, "runs": [_run("sgd", 0.92, 0.3, 0.020, 2.0, 4.0),
                         _run("kfac", 0.97, 0.2, 0.050, 5.0, None)]},
]


def test_number_formatting():
    assert num(0.97123) == "0.971" and num(1234.5) == "1,234" and num(12) == "12"
    assert num(None) == "–" and num(float("nan")) == "–" and num(0.0) == "0"
    assert num(1.234e-5) == "1.23e-5" and num(3.14159, 2) == "3.1"
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert pm([0.9, 0.92], 100.0) == "91 ± 1.4" and pm([0.5]) == "0.5" and pm([None]) == "–"


def test_md_table_shape():
    table = md_table(["a", "b"], [["x", 1.23456], ["y|z", None]])
    lines = table.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "| --- | ---: |"
    assert lines[2] == "| x | 1.23 |" and lines[3] == "| y\\|z | – |"


def test_ratios_to_sgd_of_the_same_run():
    r = timing_ratios(SEED_RUNS)
    assert r["sgd"]["step_ratio"] == [1.0, 1.0]
    assert r["kfac"]["step_ratio"] == pytest.approx([3.0, 2.5])
    assert r["kfac"]["wall_ratio"] == pytest.approx([3.0, 2.5])
    assert r["kfac"]["time_to_target_ratio"] == [0.5, None]  # not reached with seed 1
    md = timing_md({"models": {"mlp": {"metric": "test_accuracy", "seed_runs": SEED_RUNS}},
                    "target_accuracy": 0.9})
    assert "| kfac | 40 ± 14 | 2.75 ± 0.35× | 2.75 ± 0.35× | 1 | 0.5× (never in 1/2) |" in md


def test_parity_mean_std_and_missing():
    doc = {"seeds": [0, 1], "optimizers": ["sgd", "kfac"], "missing": ["pkfac"],
           "models": {"mlp": {"epochs": 2, "metric": "test_accuracy", "seed_runs": SEED_RUNS},
                      "cnn": {"epochs": 1, "metric": "test_accuracy", "seed_runs": [],
                              "error": "boom"}}}
    md = parity_md(doc)
    assert "| mlp (2 ep., test acc. % ↑) | 91 ± 1.4 | 96 ± 1.4 |" in md
    assert "not available: boom" in md and "pkfac" in md


def test_stability_pivot():
    results = [{"optimizer": o, "damping": d, "seed": s, "diverged": o == "rkfac" and d < 1e-2,
                "test_accuracy": 0.8} for o in ("kfac", "rkfac") for d in (1e-1, 1e-3)
               for s in (0, 1)]
    cfg = {"epochs": 1, "lr": 0.05, "seeds": [0, 1], "divergence_factor": 1.5,
           "hidden": [256, 128], "train_size": 4000}
    md = stability_md({"bench": {"config": cfg, "results": results}})
    assert "| optimizer | λ=0.1 | λ=0.001 | total |" in md
    assert "| rkfac | 0/2 | 2/2 | 2/4 |" in md and "| kfac | 80 ± 0 | 80 ± 0 |" in md
    assert "MLP 784-256-128-10" in md


def test_results_md_header_and_statuses():
    meta = {"command": "natgrad reproduce --quick --out docs", "mode": "quick",
            "date": "2030-01-01 00:00 UTC", "total_time_s": 90.0,
            "machine": {"platform": "Linux-x", "cpu_count": 2, "threads": 2, "torch": "2.13.0",
                        "python": "3.11", "natgrad": "0.1"}}
    statuses = {"parity": {"status": "skipped", "reason": "--skip"},
                "scaling": {"status": "not available", "reason": "no bench", "time_s": 0.1},
                "discussion": {"status": "ok", "time_s": 0.0, "json": "results/discussion.json"}}
    docs = {"discussion": {"text": "# Discussion\n\nTODO(lead)\n"}}
    md = results_md(meta, statuses, docs, PART_TITLES)
    assert md.startswith("<!-- GENERATED FILE")
    assert "`natgrad reproduce --quick --out docs`" in md and "torch 2.13.0" in md
    assert "2 CPUs" in md and "2030-01-01" in md
    assert "not available: no bench" in md and "skipped (--skip)" in md
    assert "# Discussion\n\nTODO(lead)" in md
    assert "assembled" not in md
    statuses["scaling"]["note"] = "assembled from two runs"
    assert "*assembled from two runs*" in results_md(meta, statuses, docs, PART_TITLES)


@pytest.mark.parametrize("argv, message", [
    (["--only", "parity", "--skip", "timing"], "cannot be combined"),
    (["--only", "nope"], "unknown part 'nope'"),
    (["--skip", "parity,parity"], "listed twice"),
    (["--seeds", "0,x"], "--seeds expects"),
    (["--threads", "0"], "--threads must be"),
])
def test_usage_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["reproduce", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "RESULTS.md").exists()


def test_tiny_parity_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    discussion = tmp_path / "DISCUSSION.md"
    discussion.write_text("# Discussion\n\nhand-written text\n")
    try:
        rc = main(["reproduce", "--tiny", "--only", "parity,discussion", "--out",
                   str(tmp_path / "docs"), "--threads", "1", "--no-progress",
                   "--discussion", str(discussion)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = tmp_path / "docs"
    parity = json.loads((out / "results" / "parity.json").read_text())
    assert set(parity["models"]) == {"mlp", "cnn", "autoencoder"}
    assert "sgd" in parity["optimizers"] and set(parity["optimizers"]) | set(
        parity["missing"]) == {"sgd", "adam", "kfac", "rkfac", "pkfac"}
    md = (out / "RESULTS.md").read_text()
    assert "GENERATED FILE" in md and "natgrad reproduce --tiny" in md
    assert "| mlp (1 ep., test acc. % ↑) |" in md and "hand-written text" in md
    for part in PARTS:
        if part not in ("parity", "discussion"):
            assert f"{PART_TITLES[part]}\n\nskipped" in md
    for fig in parity["models"]["mlp"]["figures"]:
        assert (out / fig).is_file() and f"]({fig})" in md
    assert "estimated time" in capsys.readouterr().out

    # --render rebuilds the document from the saved JSON with the edited discussion only
    discussion.write_text("# Discussion\n\nrevised text\n")
    assert main(["reproduce", "--render", "--out", str(out), "--discussion",
                 str(discussion)]) == 0
    rebuilt = (out / "RESULTS.md").read_text()
    assert "revised text" in rebuilt and "hand-written text" not in rebuilt
    assert rebuilt.replace("revised", "hand-written") == md

    # --update runs one part and keeps the parity results of the earlier run, marked as such
    try:
        assert main(["reproduce", "--tiny", "--only", "stability,discussion", "--update",
                     "--out", str(out), "--threads", "1", "--no-progress",
                     "--discussion", str(discussion)]) == 0
    finally:
        torch.set_num_threads(threads)
    updated = (out / "RESULTS.md").read_text()
    assert "| mlp (1 ep., test acc. % ↑) |" in updated  # parity kept, byte for byte
    assert "(an earlier run, kept by `--update`)" in updated
    assert f"{PART_TITLES['stability']}\n\nskipped" not in updated
    assert f"{PART_TITLES['scaling']}\n\nskipped" in updated  # never run: still skipped
    index = json.loads((out / "results" / "reproduce.json").read_text())
    assert "--only parity,discussion" in index["parts"]["parity"]["command"]
    assert "--update" in index["parts"]["stability"]["command"]
    assert json.loads((out / "results" / "parity.json").read_text()) == parity


def test_render_without_a_previous_run_is_a_usage_error(tmp_path, capsys):
    assert main(["reproduce", "--render", "--out", str(tmp_path)]) == 2
    assert "run natgrad reproduce first" in capsys.readouterr().err


def test_tiny_families_and_convergence_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = main(["reproduce", "--tiny", "--only", "families,steps,convergence", "--out",
                   str(tmp_path / "docs"), "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = tmp_path / "docs"
    fam = json.loads((out / "results" / "families.json").read_text())
    runs = fam["models"]["transformer"]["seed_runs"][0]["runs"]
    assert [r["optimizer"] for r in runs] == ["sgd", "adamw", "kfac", "pkfac", "pkfac+adamw"]
    frac = fam["models"]["transformer"]["preconditioned"]
    assert frac["sgd"] == 0.0 and frac["adamw"] == 0.0
    assert 0.5 < frac["kfac"] <= 1.0 and frac["pkfac+adamw"] == frac["pkfac"]
    steps = json.loads((out / "results" / "steps.json").read_text())["models"]["transformer"]
    assert [r["optimizer"] for r in steps["runs"]] == [r["optimizer"] for r in runs]
    assert steps["runs"][0]["ratio_median"] == 1.0 and steps["rounds"] == 3
    conv = json.loads((out / "results" / "convergence.json").read_text())
    entry = conv["models"]["transformer"]
    grid = entry["grid_validation_accuracy"]
    assert set(grid) == {"sgd", "adamw", "kfac", "pkfac"}
    for opt, scores in grid.items():  # the chosen lr is the grid's best on the validation split
        assert entry["chosen_lr"][opt] == float(max(scores, key=scores.get))
    chosen = {r["optimizer"]: r["lr"] for r in entry["seed_runs"][0]["runs"]}
    assert chosen == entry["chosen_lr"]
    md = (out / "RESULTS.md").read_text()
    assert "Share of the parameters that take the natural-gradient step" in md
    assert "**transformer** on majority, batch 128, 3 rounds" in md
    assert "**transformer** on majority:" in md and "| optimizer | lr | test acc. % |" in md
    assert f"{PART_TITLES['parity']}\n\nskipped" in md


def test_peers_part_is_not_available_without_the_peers(tmp_path, monkeypatch):
    import natgrad.bench.analysis as bench

    monkeypatch.setattr(bench, "peer_versions", lambda: {"natgrad": "x", "backpack": None,
                                                         "curvlinops": None})
    rc = main(["reproduce", "--tiny", "--only", "peers", "--out", str(tmp_path), "--threads",
               "1", "--no-progress"])
    assert rc == 1
    md = (tmp_path / "RESULTS.md").read_text()
    assert "not available: neither BackPACK nor curvlinops is installed" in md
    assert "requirements-peers.txt" in md


def test_tiny_peers_part(tmp_path):
    import natgrad.bench.analysis as bench

    versions = bench.peer_versions()
    if versions["backpack"] is None and versions["curvlinops"] is None:
        pytest.skip("neither BackPACK nor curvlinops installed (benchmarks/requirements-peers.txt)")
    threads = torch.get_num_threads()
    try:
        rc = main(["reproduce", "--tiny", "--only", "peers", "--out", str(tmp_path),
                   "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads((tmp_path / "results" / "peers.json").read_text())
    trace = doc["cases"]["mlp"]["quantities"]["trace"]
    assert trace["natgrad"]["status"] == "ok" and trace["natgrad"]["error"] < 1e-6
    md = (tmp_path / "RESULTS.md").read_text()
    assert "natgrad / fastest peer" in md and "| mlp (" in md
