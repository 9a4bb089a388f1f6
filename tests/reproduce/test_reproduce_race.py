"""The ``race`` part of ``natgrad reproduce``: registration, the optimizer lists, the estimate,
and one tiny run through the command into RESULTS.md."""

from __future__ import annotations

import json

import torch

from natgrad.cli.main import main
from natgrad.reproduce import PART_TITLES, PARTS
from natgrad.reproduce.markdown import RENDERERS
from natgrad.reproduce.parts import RUNNERS
from natgrad.reproduce.race import RACE_OPTIMIZERS, estimate_race, race_config, race_optimizers
from natgrad.reproduce.settings import FULL, QUICK, TINY


def test_registered_before_the_discussion():
    assert PARTS[-2:] == ("race", "discussion") and "race" in RUNNERS and "race" in RENDERERS
    assert PART_TITLES["discussion"].startswith("12.")


def test_optimizers_and_settings_per_mode():
    raced, missing = race_optimizers("gpt")
    assert set(raced) | set(missing) == set(RACE_OPTIMIZERS["gpt"])
    assert "muon" not in RACE_OPTIMIZERS["resnet8"]  # torch's Muon takes 2-D matrices only
    cfg = race_config(FULL, "gpt")
    assert cfg.steps >= 2000 and cfg.seeds == (0, 1, 2) and cfg.threads == 1
    assert race_config(FULL, "resnet8").model == "resnet8"
    assert race_config(TINY, "gpt").steps < 10
    assert estimate_race(FULL) > estimate_race(QUICK) > estimate_race(TINY) > 0


def test_tiny_race_part_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = main(["reproduce", "--tiny", "--only", "race", "--out", str(tmp_path),
                   "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads((tmp_path / "results" / "race.json").read_text())
    gpt = doc["models"]["gpt"]
    assert list(gpt["summary"]["optimizers"]) == race_optimizers("gpt", "tiny")[0] == [
        "adamw", "muon", "pkfac"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert PART_TITLES["race"] in md and "**gpt** on shakespeare_char" in md
    assert "| optimizer | picked | reached |" in md
