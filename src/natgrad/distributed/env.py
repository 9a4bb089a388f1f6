"""Process-group set-up and rank helpers that work the same with and without ``torchrun``.

Every helper degrades to the single-process answer when ``torch.distributed`` is not initialised
(``rank() == 0``, ``world_size() == 1``, ``shard(x) is x``), so training code can call them
unconditionally::

    info = init_from_env()              # no-op outside torchrun
    x, y = shard((x, y))                # this rank's contiguous slice of the global batch
    if is_main():
        print(...)

Errors of collectives are re-raised as :class:`DistributedError` naming the operation, the rank
and the timeout, so a dead or diverged rank gives a clear message instead of a bare gloo error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

#: default timeout of collectives (seconds), overridable with ``NATGRAD_DIST_TIMEOUT``
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed or timed out (a rank died, hangs, or runs a different program)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    """``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Any = None) -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


def timeout_s() -> float:
    """Collective timeout in seconds: ``NATGRAD_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`."""
    return float(os.environ.get("NATGRAD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def init_from_env(
    backend: str | None = None, timeout: float | None = None, device: str | None = None
) -> DistInfo:
    """Initialise the default process group from the ``torchrun`` environment, if there is one.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    the ``env://`` rendezvous). Without ``WORLD_SIZE > 1`` nothing is initialised and the
    single-process :class:`DistInfo` is returned. Idempotent.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when the device is CUDA, else ``gloo``.
        timeout: collective timeout in seconds (default :func:`timeout_s`); a rank that dies or
            stops participating makes the others fail after at most this long.
        device: ``"cpu"`` / ``"cuda"``; with CUDA each process uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = (device or "cpu").startswith("cuda")
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if world <= 1 and not is_initialized():
        return DistInfo(device=torch.device(device) if device else dev)
    if want_cuda:
        torch.cuda.set_device(dev)
    if not is_initialized():
        backend = backend or ("nccl" if want_cuda else "gloo")
        dist.init_process_group(
            backend=backend, timeout=timedelta(seconds=timeout if timeout else timeout_s())
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local,
        backend=str(dist.get_backend()),
        device=dev,
    )


def shutdown() -> None:
    """Destroy the default process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous slice of ``n`` items.

    Slices follow ``torch.tensor_split``: the first ``n % world`` ranks get one more item, and the
    slices concatenated in rank order give back the whole batch — which is what makes the
    distributed run equal to one process on the concatenated batch.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(batch: T, rank_: int | None = None, world: int | None = None) -> T:
    """This rank's slice (along dim 0) of a tensor or a tuple/list of tensors of one batch."""
    if isinstance(batch, torch.Tensor):
        start, stop = shard_bounds(batch.shape[0], rank_, world)
        return batch[start:stop]  # type: ignore[return-value]
    if isinstance(batch, Sequence):
        return type(batch)(shard(b, rank_, world) for b in batch)  # type: ignore[return-value]
    raise TypeError(f"shard expects a tensor or a sequence of tensors, got {type(batch).__name__}")


def all_reduce_sum(value: float, group: Any = None) -> float:
    """``value`` summed over the ranks (itself in a single process); e.g. epoch losses."""
    if world_size(group) == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    with collective("all_reduce (scalar)", group):
        dist.all_reduce(t, group=group)
    return float(t)


def broadcast_object(obj: T, src: int = 0, group: Any = None) -> T:
    """``obj`` from rank ``src`` on every rank (identity in a single process)."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    with collective("broadcast_object", group):
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


@contextmanager
def collective(what: str, group: Any = None) -> Iterator[None]:
    """Re-raise failures of the collectives inside as :class:`DistributedError` with context."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        raise DistributedError(
            f"natgrad.distributed: {what} failed on rank {rank(group)} of {world_size(group)} "
            f"(timeout {timeout_s():g} s unless set otherwise at init): another rank probably "
            f"died, stopped calling the optimizer, or runs a different model/configuration. "
            f"Original error: {err}"
        ) from err


def wait_all(works: Sequence[Any], what: str, group: Any = None) -> None:
    """Wait for async collective handles, with :func:`collective` error context."""
    with collective(what, group):
        for work in works:
            if work is not None:
                work.wait()


def call(fn: Callable[..., T], what: str, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` inside :func:`collective`."""
    with collective(what, kwargs.get("group")):
        return fn(*args, **kwargs)
