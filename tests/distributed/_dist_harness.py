"""Run a function on W gloo processes on CPU (spawned, free port, bounded timeout).

``run_distributed(fn, world=2, timeout=60, **kwargs)`` calls ``fn(rank, world, **kwargs)`` in each
process after ``init_process_group("gloo")`` and returns the per-rank results (via files). A rank
that raises makes the call raise ``WorkerError`` with that rank's traceback; ranks still running at
the deadline are killed and ``TimeoutError`` is raised, so a test never hangs.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker raised; the message holds its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, out: str,
           coll_timeout: float, kwargs: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=coll_timeout),
        )
        result = {"ok": True, "value": fn(rank, world, **kwargs)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_distributed(
    fn: Callable[..., Any],
    world: int = 2,
    timeout: float = 60.0,
    collective_timeout: float = 30.0,
    allow_errors: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """Per-rank ``fn(rank, world, **kwargs)`` results (``{"ok", "value"|"error"}`` dicts when
    ``allow_errors``; a missing result file reads as ``None``)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world, port, out, collective_timeout, kwargs))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if alive:
            raise TimeoutError(f"ranks {alive} still running after {timeout:g} s (killed)")
        results = []
        for r in range(world):
            path = os.path.join(out, f"rank{r}.pt")
            res = torch.load(path, weights_only=False) if os.path.exists(path) else None
            results.append(res)
    if allow_errors:
        return results
    for r, res in enumerate(results):
        if res is None:
            raise WorkerError(f"rank {r} exited without a result")
        if not res["ok"]:
            raise WorkerError(f"rank {r} failed:\n{res['error']}")
    return [res["value"] for res in results]
