"""Data-parallel K-FAC on 2 gloo processes equals one process on the concatenated batch."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist_harness import run_distributed
from _dist_workers import (
    MID,
    STEPS,
    configs,
    dead_rank_worker,
    equivalence_worker,
    make_data,
    make_kfac,
    make_model,
    reference,
    train_steps,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

RTOL, ATOL = 1e-8, 1e-10


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(equivalence_worker, world=2, timeout=120)


def _assert_same(a: Any, b: Any, path: str = "", exact: bool = False) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]", exact)
    elif isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=path)
    else:
        assert a == b, path


@pytest.mark.parametrize("name", list(configs()))
def test_matches_single_process_on_global_batch(runs, name):
    ref = reference(configs()[name]["strategy"])
    for rank, res in enumerate(runs):
        for p, q in zip(res[name]["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=f"rank {rank}")
        # the factors themselves equal the single-process ones
        for layer, (sa, sg) in ref["sd"]["natgrad"]["factors"].items():
            da, dg = res[name]["sd"]["natgrad"]["factors"][layer]
            for key in ("F", "updates", "refreshed"):
                if key in sa:
                    _assert_same(da[key], sa[key], f"{layer}/A/{key}")
                    _assert_same(dg[key], sg[key], f"{layer}/G/{key}")


@pytest.mark.parametrize("name", list(configs()))
def test_state_dict_identical_across_ranks(runs, name):
    """Broadcast state is bitwise identical; the rest agrees to rounding.

    gloo's all-reduce (DDP's too) is not bitwise identical across ranks, so gradients, momentum
    buffers and all-reduced moments may differ in the last ulp.
    """
    sd0, sd1 = dict(runs[0][name]["sd"]), dict(runs[1][name]["sd"])
    n0, n1 = dict(sd0.pop("natgrad")), dict(sd1.pop("natgrad"))
    assert not torch.equal(n0.pop("generator"), n1.pop("generator"))  # independent MC labels
    f0, f1 = n0.pop("factors"), n1.pop("factors")
    _assert_same(n0, n1, exact=True)
    _assert_same(sd0, sd1)
    for layer in f0:
        for a, b in zip(f0[layer], f1[layer]):
            for key in a:
                _assert_same(a[key], b[key], f"{layer}/{key}", exact=key != "F")


def test_every_layer_has_one_owner_and_both_ranks_work(runs):
    owner = runs[0]["eigh-ddp-auto"]["owner"]
    assert owner == runs[1]["eigh-ddp-auto"]["owner"]
    assert set(owner) == {"0", "3", "5"}
    assert set(owner.values()) == {0, 1}


def test_checkpoint_from_rank0_resumes_in_one_process(runs):
    """Rank 0's mid-run checkpoint, loaded into a single process, continues the same trajectory."""
    mid = runs[0]["eigh-ddp-auto"]["mid"]
    model = make_model()
    model.load_state_dict(mid["model"])
    opt = make_kfac(model, "eigh")
    opt.load_state_dict(mid["opt"])
    train_steps(model, opt, make_data()[MID:STEPS])
    ref = reference("eigh")
    for p, q in zip(model.parameters(), ref["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=RTOL, atol=ATOL)


def test_mc_fisher_backward_leaves_ddp_gradients_alone(runs):
    for res in runs:
        assert res["mc-ddp"]["max_grad_err"] < 1e-12
        assert res["mc-ddp"]["mc_stats_nonzero"]
    for p, q in zip(runs[0]["mc-ddp"]["params"], runs[1]["mc-ddp"]["params"]):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)  # same step on every rank


def test_mismatched_model_raises_on_every_rank(runs):
    for res in runs:
        assert res["mismatch"]["raised"]
        assert "differs across ranks" in res["mismatch"]["message"]
        assert "rank 1" in res["mismatch"]["message"]


def test_dead_rank_gives_clear_error_quickly():
    t0 = time.monotonic()
    results = run_distributed(dead_rank_worker, world=2, timeout=60, collective_timeout=10,
                              allow_errors=True)
    assert time.monotonic() - t0 < 60
    assert results[0] is not None and results[0]["ok"], results[0]
    assert "natgrad.distributed" in results[0]["value"]
    assert "died" in results[0]["value"]
