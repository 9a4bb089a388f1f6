"""How large a network each optimizer can train: step time, peak memory and state vs parameters.

Configurations: the MLP ``784-w-w-10`` for each width ``w`` of :attr:`CapacityConfig.widths` and
one wide CNN (:class:`~natgrad.models.widecnn.WideCNN`, ``cnn_channels``), batch 128, float32,
batches of the embedded ``mnist5k`` training set. Optimizers come from the registry
(:data:`natgrad.optim.registry.OPTIMIZERS`); ``<name>-every`` is a K-FAC entry with statistics
and refresh on every step (``curvature_every = inverse_every = 1``, the registry factory's own
keyword arguments).

Every (model, width, optimizer) runs in a **fresh child process** (``python -m
natgrad.bench.capacity --worker JOB``), so that its peak memory is its own. The child builds the
model and optimizer, then takes ``1 + warmup + steps`` steps (forward, backward,
``optimizer.step()``; the batches are gathered beforehand) and reports each step on its stdout.
The parent polls the child's ``/proc/<pid>/status`` every ``poll_s`` seconds and enforces the
budgets, killing the child when one is exceeded:

* ``time_budget_s``: seconds of stepping (from the start of the first step); the setup (imports,
  data, model and optimizer) has its own allowance, ``setup_budget_s``;
* ``memory_budget_gib``: the child's resident set (``VmRSS``), whole process (torch included).

Measured per configuration (seconds from ``time.perf_counter``, bytes):

* ``first_step_s``: the first step, which holds dense K-FAC's first eigendecomposition (``None``
  when the first step did not finish);
* ``step_time_s_median`` / ``step_time_s_mean``: over the ``steps`` steps after the first and
  the ``warmup`` ones (the mean includes the periodic refreshes, the median shows the usual
  step); ``ratio_to_sgd``: the median over SGD's median at the same model and width;
* ``peak_rss_bytes``: the child's peak resident set (``VmHWM`` read by the parent, and the
  child's own ``VmHWM`` / ``ru_maxrss`` at its end), measured, not estimated; ``base_rss_bytes``:
  its resident set after imports and data, before the model exists;
* ``state_bytes``: the optimizer's state: the bytes of the tensors with at least one dimension
  in ``optimizer.state`` (momentum, Adam's two moments; the scalar step counters are left out)
  plus natgrad's factor state (``memory_usage()``); ``state_fraction`` = state bytes / parameter
  bytes.

``status`` is ``ok``, ``out_of_time``, ``out_of_memory`` (over the budget, an allocation
failure, or killed by the system) or ``failed`` (``error`` holds the child's message). With
``skip_larger`` an optimizer that ran out of time or memory at one MLP width is not started at
the larger ones: those rows keep the status with ``note = "skipped: out_of_time at w=…"``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..progress import progress_bar
from ..report import (
    format_table,
    load_average,
    optional_figures,
    pyplot,
    save_figure,
    write_json,
)

#: the optimizers of the default run
DEFAULT_OPTIMIZERS = ("sgd", "adam", "kfac", "pkfac", "pkfac-every")
#: the K-FAC keyword arguments of a ``<name>-every`` variant
EVERY = {"curvature_every": 1, "inverse_every": 1}
EVERY_SUFFIX = "-every"
STATUSES = ("ok", "out_of_time", "out_of_memory", "failed")
#: the model names of the MLP and CNN configurations
MLP, CNN = "mlp", "widecnn"
_PREFIX = "@capacity "  # marks the child's report lines on its stdout
_GIB = 2**30


# ---------------------------------------------------------------------- optimizers
def optimizer_names() -> tuple[str, ...]:
    """Every accepted optimizer: the registry's names, and ``<name>-every`` for its K-FAC
    entries."""
    from ..optim.registry import OPTIMIZERS

    every = tuple(f"{n}{EVERY_SUFFIX}" for n, s in OPTIMIZERS.items() if s.strategy)
    return (*OPTIMIZERS, *every)


def resolve_optimizer(label: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, factory keyword arguments)`` of an accepted optimizer label."""
    from ..optim.registry import OPTIMIZERS

    if label in OPTIMIZERS:
        return label, {}
    base = label.removesuffix(EVERY_SUFFIX)
    if label.endswith(EVERY_SUFFIX) and base in OPTIMIZERS and OPTIMIZERS[base].strategy:
        return base, dict(EVERY)
    raise ValueError(f"unknown optimizer {label!r}; accepted: {', '.join(optimizer_names())}")


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state: tensors with ``ndim ≥ 1`` in ``opt.state`` (each storage
    once) plus ``memory_usage()`` of the optimizer and of its ``preconditioner``, if any."""
    seen: set[int] = set()
    total = 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                ptr = value.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += value.numel() * value.element_size()
    for owner in (opt, getattr(opt, "preconditioner", None)):
        usage = getattr(owner, "memory_usage", None)
        if callable(usage):
            total += int(sum(usage().values()))
    return total


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CapacityConfig:
    """Settings of :func:`run_capacity`.

    Attributes:
        widths: hidden widths ``w`` of the MLPs ``784-w-w-10``.
        cnn_channels: conv channels of the wide CNN (``None``: no CNN).
        optimizers: labels of :func:`optimizer_names`.
        steps: timed steps (median and mean reported).
        warmup: untimed steps between the first step and the timed ones.
        batch: samples per step.
        time_budget_s: seconds of stepping per configuration.
        setup_budget_s: seconds for a child's setup (imports, data, model and optimizer).
        memory_budget_gib: resident-set budget per configuration, GiB.
        threads: ``torch.set_num_threads`` in each child (``None``: torch's choice there).
        seed: initial weights and batch order.
        poll_s: seconds between two readings of a child's memory.
        skip_larger: do not start an optimizer at a larger MLP width once it ran out of time or
            memory at a smaller one.
    """

    widths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    cnn_channels: tuple[int, ...] | None = (128, 256, 512)
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    steps: int = 20
    warmup: int = 3
    batch: int = 128
    time_budget_s: float = 600.0
    setup_budget_s: float = 300.0
    memory_budget_gib: float = 20.0
    threads: int | None = None
    seed: int = 0
    poll_s: float = 0.02
    skip_larger: bool = True

    def __post_init__(self) -> None:
        for name in ("widths", "cnn_channels"):
            values = getattr(self, name)
            if values is None and name == "cnn_channels":
                continue
            if not values or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        if not self.optimizers:
            raise ValueError(f"optimizers must not be empty; accepted: "
                             f"{', '.join(optimizer_names())}")
        for label in self.optimizers:
            resolve_optimizer(label)
        for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("time_budget_s", "setup_budget_s", "memory_budget_gib", "poll_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads}")

    def jobs(self) -> list[Job]:
        """The configurations, MLPs by increasing width then the CNN; SGD first in each (the
        others' ratios need its median)."""
        order = sorted(self.optimizers, key=lambda o: o != "sgd")
        models = [(MLP, (w, w)) for w in sorted(self.widths)]
        if self.cnn_channels is not None:
            models.append((CNN, tuple(self.cnn_channels)))
        return [Job(m, hidden, o, self.steps, self.warmup, self.batch, self.threads, self.seed)
                for m, hidden in models for o in order]


@dataclass(frozen=True)
class Job:
    """One configuration, as the child process receives it (JSON)."""

    model: str
    hidden: tuple[int, ...]
    optimizer: str
    steps: int
    warmup: int
    batch: int
    threads: int | None
    seed: int

    @property
    def width(self) -> int:
        """The MLP's hidden width; the CNN's widest conv layer."""
        return max(self.hidden)

    @property
    def label(self) -> str:
        return f"{self.model} w={self.width} {self.optimizer}"


def count_params(model: str, hidden: Sequence[int]) -> int:
    """Parameters of a configuration's network, counted on the meta device (nothing allocated)."""
    from ..data import dataset_info
    from ..models import build_model

    with torch.device("meta"):
        net = build_model(model, dataset_info("mnist5k"), tuple(hidden))
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------- the child
def _status_bytes(pid: int | str, *keys: str) -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` … of ``/proc/<pid>/status`` in bytes (``{}`` where unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


def _own_peak_bytes() -> int:
    """This process's peak resident set: ``VmHWM``, or ``ru_maxrss`` (KiB on Linux, bytes on
    macOS)."""
    hwm = _status_bytes("self", "VmHWM").get("VmHWM", 0)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(hwm, maxrss if sys.platform == "darwin" else maxrss * 1024)


def _emit(event: str, **data: Any) -> None:
    print(_PREFIX + json.dumps({"event": event, **data}), flush=True)


def _is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or (
        "out of memory" in text)


def run_job(job: Job, emit: Callable[..., None] = _emit) -> None:
    """The child's work: build, step, report (``emit(event, **data)`` per phase and step)."""
    import torch.nn.functional as F

    from ..data import load_dataset
    from ..models import build_model
    from ..optim.registry import make_optimizer

    if job.threads is not None:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    train_set, _ = load_dataset("mnist5k")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(job.seed))
    x_all, y_all = train_set.x[order], train_set.y[order]
    n_batches = max(1, len(train_set) // job.batch)
    batches = [(x_all[i * job.batch:(i + 1) * job.batch].contiguous(),
                y_all[i * job.batch:(i + 1) * job.batch].contiguous()) for i in range(n_batches)]
    base = _status_bytes("self", "VmRSS").get("VmRSS")
    model = build_model(job.model, train_set.info, job.hidden).float()
    name, kwargs = resolve_optimizer(job.optimizer)
    opt = make_optimizer(name, model, loss_kind="cross_entropy", **kwargs)
    emit("ready", base_rss_bytes=base, threads=torch.get_num_threads())
    loss = None
    for i in range(1 + job.warmup + job.steps):
        x, y = batches[i % n_batches]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        emit("step", i=i, time_s=time.perf_counter() - t0)
    emit("done", state_bytes=optimizer_state_bytes(opt), peak_rss_bytes=_own_peak_bytes(),
         final_loss=None if loss is None else loss.item())


def worker_main(argv: Sequence[str]) -> int:
    """``python -m natgrad.bench.capacity --worker JOB_JSON``: :func:`run_job`; an exception is
    reported as an ``error`` event (exit code 1)."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m natgrad.bench.capacity --worker JOB_JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[1])
        spec["hidden"] = tuple(spec["hidden"])
        run_job(Job(**spec))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        _emit("error", message=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
              out_of_memory=_is_allocation_failure(exc),
              traceback=traceback.format_exc()[-4000:])
        return 1
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (a second or more with torch loaded): the
    report is complete once the streams are flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------- the parent
def _reader(stream: Iterable[str], events: queue.Queue, other: collections.deque) -> None:
    for line in stream:
        if line.startswith(_PREFIX):
            try:
                events.put(json.loads(line[len(_PREFIX):]))
                continue
            except json.JSONDecodeError:
                pass
        other.append(line.rstrip("\n"))


def _child_env() -> dict[str, str]:
    """The environment with this natgrad's source root first on ``PYTHONPATH``, so that the
    child imports the same package as the parent."""
    env = os.environ.copy()
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class _Watch:
    """What the parent saw of one child."""

    events: list[dict[str, Any]] = field(default_factory=list)
    peak_rss: int = 0
    killed: str | None = None  # "out_of_time" | "out_of_memory"
    returncode: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    setup_s: float | None = None
    wall_s: float = 0.0
    polled: bool = False


def watch_job(job: Job, time_budget_s: float, memory_budget_bytes: int,
              poll_s: float = 0.02, setup_budget_s: float = 300.0) -> _Watch:
    """Run ``job`` in a child process under the budgets (seconds of setup, seconds of steps,
    bytes of resident memory); returns what was seen (never raises for the child's sake)."""
    w = _Watch()
    events: queue.Queue = queue.Queue()
    err_tail: collections.deque = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "natgrad.bench.capacity", "--worker", json.dumps(asdict(job))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    readers = [threading.Thread(target=_reader, args=(s, events, err_tail), daemon=True)
               for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    phase_start = t0
    try:
        while True:
            while not events.empty():
                ev = events.get()
                w.events.append(ev)
                if ev["event"] == "ready":
                    phase_start = time.perf_counter()
                    w.setup_s = phase_start - t0
            if proc.poll() is not None:
                break
            mem = _status_bytes(proc.pid, "VmRSS", "VmHWM")
            if mem:
                w.polled = True
                w.peak_rss = max(w.peak_rss, mem.get("VmHWM", 0), mem.get("VmRSS", 0))
            if mem.get("VmRSS", 0) > memory_budget_bytes:
                w.killed = "out_of_memory"
            elif time.perf_counter() - phase_start > (
                    time_budget_s if w.setup_s is not None else setup_budget_s):
                w.killed = "out_of_time"
            if w.killed:
                proc.kill()
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        w.returncode = proc.wait()
        for r in readers:
            r.join(timeout=10)
    w.wall_s = time.perf_counter() - t0
    while not events.empty():
        w.events.append(events.get())
    w.stderr_tail = list(err_tail)
    return w


def _row(job: Job, params: int, w: _Watch, memory_budget_gib: float) -> dict[str, Any]:
    """One ``capacity.json`` row from what the parent saw."""
    by_kind: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for ev in w.events:
        by_kind[ev["event"]].append(ev)
    times = {ev["i"]: ev["time_s"] for ev in by_kind["step"]}
    skip = 1 + job.warmup
    timed = [times[i] for i in sorted(times) if i >= skip]
    done = by_kind["done"][0] if by_kind["done"] else None
    error = by_kind["error"][0] if by_kind["error"] else None
    ready = by_kind["ready"][0] if by_kind["ready"] else {}
    note = None
    # every step done: a time-budget kill during the child's exit came after the work
    if done is not None and w.killed in (None, "out_of_time"):
        status = "ok"
    elif w.killed is not None:
        status = w.killed
        what = (f"the {memory_budget_gib:g} GiB memory budget" if status == "out_of_memory"
                else "the time budget")  # of the setup when not ready
        note = f"stopped at {what}" + ("" if ready else " during setup")
    elif error is not None:
        status = "out_of_memory" if error["out_of_memory"] else "failed"
    elif w.returncode == -9:
        status, note = "out_of_memory", "killed by SIGKILL, not by the bench (the system's OOM " \
                                        "killer?)"
    else:
        status = "failed"
    message = None
    if status in ("failed", "out_of_memory") and (error or not done) and not w.killed:
        message = error["message"] if error else (
            f"exit code {w.returncode}: " + " | ".join(w.stderr_tail[-3:]))
    param_bytes = params * 4
    state = done["state_bytes"] if done else None
    ok = status == "ok"
    return {
        "model": job.model, "width": job.width, "hidden": list(job.hidden), "params": params,
        "param_bytes": param_bytes, "optimizer": job.optimizer, "status": status,
        "note": note, "error": message, "skipped": False,
        "first_step_s": times.get(0),
        "step_time_s_median": statistics.median(timed) if ok and timed else None,
        "step_time_s_mean": statistics.fmean(timed) if ok and timed else None,
        "step_times_s": timed, "steps_done": len(times),
        "sgd_step_time_s_median": None, "ratio_to_sgd": None,
        "peak_rss_bytes": max(w.peak_rss, done["peak_rss_bytes"] if done else 0) or None,
        "base_rss_bytes": ready.get("base_rss_bytes"),
        "state_bytes": state, "state_fraction": None if state is None else state / param_bytes,
        "final_loss": done["final_loss"] if done else None,
        "threads": ready.get("threads"), "setup_s": w.setup_s, "wall_s": w.wall_s,
    }


def _skipped_row(job: Job, params: int, status: str, at_width: int) -> dict[str, Any]:
    return {"model": job.model, "width": job.width, "hidden": list(job.hidden), "params": params,
            "param_bytes": params * 4, "optimizer": job.optimizer, "status": status,
            "note": f"skipped: {status} at w={at_width}", "error": None, "skipped": True,
            **dict.fromkeys(("first_step_s", "step_time_s_median", "step_time_s_mean",
                             "sgd_step_time_s_median", "ratio_to_sgd", "peak_rss_bytes",
                             "base_rss_bytes", "state_bytes", "state_fraction", "final_loss",
                             "threads", "setup_s")),
            "step_times_s": [], "steps_done": 0, "wall_s": 0.0}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    sgd = {(r["model"], r["width"]): r["step_time_s_median"] for r in rows
           if r["optimizer"] == "sgd"}
    for r in rows:
        ref = sgd.get((r["model"], r["width"]))
        r["sgd_step_time_s_median"] = ref
        if ref and r["step_time_s_median"] is not None:
            r["ratio_to_sgd"] = r["step_time_s_median"] / ref


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def run_capacity(cfg: CapacityConfig, out: str | Path | None = None, progress: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Run every configuration of ``cfg`` in its own child process; write ``capacity.json`` and
    ``capacity.png`` under ``out``. Returns the document: ``meta``, ``config`` and ``rows``
    (in the order of :meth:`CapacityConfig.jobs`, then sorted by model, width and the order of
    ``cfg.optimizers``)."""
    budget_bytes = int(cfg.memory_budget_gib * _GIB)
    jobs = cfg.jobs()
    rows: list[dict[str, Any]] = []
    stopped: dict[tuple[str, str], tuple[str, int]] = {}  # (model, optimizer) → (status, width)
    params_of: dict[tuple[str, tuple[int, ...]], int] = {}
    polled = False
    t_start, load_before = time.perf_counter(), load_average()
    bar = progress_bar(total=len(jobs), desc="bench capacity", disable=not progress,
                       leave=False, dynamic_ncols=True)
    try:
        for job in jobs:
            key = (job.model, job.hidden)
            if key not in params_of:
                params_of[key] = count_params(job.model, job.hidden)
            params = params_of[key]
            bar.set_postfix_str(job.label)
            prior = stopped.get((job.model, job.optimizer))
            if cfg.skip_larger and prior is not None and prior[1] < job.width:
                rows.append(_skipped_row(job, params, *prior))
            else:
                try:
                    w = watch_job(job, cfg.time_budget_s, budget_bytes, cfg.poll_s,
                                  cfg.setup_budget_s)
                    polled = polled or w.polled
                    row = _row(job, params, w, cfg.memory_budget_gib)
                except Exception as exc:  # e.g. the child could not be started
                    row = _row(job, params, _Watch(), cfg.memory_budget_gib)
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
                if row["status"] in ("out_of_time", "out_of_memory"):
                    stopped.setdefault((job.model, job.optimizer), (row["status"], job.width))
            bar.update(1)
    finally:
        bar.close()
    rank = {o: i for i, o in enumerate(cfg.optimizers)}
    rows.sort(key=lambda r: (r["model"] != MLP, r["width"], rank[r["optimizer"]]))
    _add_ratios(rows)
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    doc = {
        "meta": {
            "machine": machine(),
            "torch_threads": threads[0] if len(threads) == 1 else threads,
            "time_budget_s": cfg.time_budget_s,
            "setup_budget_s": cfg.setup_budget_s,
            "memory_budget_gib": cfg.memory_budget_gib,
            "command": command or f"natgrad.bench.capacity.run_capacity({cfg!r})",
            "memory": "peak resident set of each child process (VmHWM from /proc/<pid>/status "
                      f"polled every {cfg.poll_s:g} s, and the child's own VmHWM / ru_maxrss)"
                      + ("" if polled or not rows else "; /proc not readable here: the budget "
                         "was not enforced"),
            "timing": "seconds; step = forward + backward + optimizer.step() of one batch; "
                      f"median / mean over the {cfg.steps} steps after the first and "
                      f"{cfg.warmup} warm-up steps",
            "state_bytes": "tensors (ndim >= 1) in optimizer.state + natgrad factor state "
                           "(memory_usage())",
            "data": "mnist5k (embedded), float32",
            "total_time_s": time.perf_counter() - t_start,
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "config": json.loads(json.dumps(asdict(cfg))),  # tuples as lists, as in the file
        "rows": rows,
    }
    if out is not None:
        out = Path(out)
        write_json(out / "capacity.json", doc)
        optional_figures(plot_capacity, doc, out / "capacity.png")
    return doc


# ---------------------------------------------------------------------- reporting
def format_capacity(doc: dict[str, Any]) -> str:
    """The rows as a table (seconds, GiB, % of the parameters' bytes) and the budgets."""
    table = []
    for r in doc["rows"]:
        table.append([
            r["model"], r["width"], r["params"], r["optimizer"], r["status"], r["first_step_s"],
            r["step_time_s_median"], r["ratio_to_sgd"],
            None if r["peak_rss_bytes"] is None else r["peak_rss_bytes"] / _GIB,
            None if r["state_fraction"] is None else 100 * r["state_fraction"],
            r["note"] or r["error"] or "",
        ])
    text = format_table(["model", "width", "params", "optimizer", "status", "first_s",
                         "median_s", "x_sgd", "peak_GiB", "state_%", "note"], table)
    m = doc["meta"]
    return (f"{text}\n\nbudgets per configuration: {m['time_budget_s']:g} s of steps, "
            f"{m['memory_budget_gib']:g} GiB resident; torch threads {m['torch_threads']}")


def _points(rows: Iterable[dict[str, Any]], key: str, scale: float = 1.0
            ) -> tuple[list[int], list[float]]:
    """``(params, value · scale)`` of the rows with a positive ``key`` (what a log axis shows)."""
    pts = [(r["params"], r[key] * scale) for r in rows if r[key] is not None and r[key] > 0]
    return [p for p, _ in pts], [v for _, v in pts]


def plot_capacity(doc: dict[str, Any], path: str | Path) -> Path:
    """Two log-log panels against the parameter count, one line per optimizer: step time over
    SGD's, and peak resident memory (``x``: a run stopped at a budget, at what it had reached;
    hollow squares: the CNN)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("ratio_to_sgd", 1.0), ("peak_rss_bytes", 1.0 / _GIB))
    drawn = [0, 0]
    for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in doc["rows"])):
        color = f"C{i % 10}"
        mine = [r for r in doc["rows"] if r["optimizer"] == opt]
        mlp = sorted((r for r in mine if r["model"] == MLP), key=lambda r: r["params"])
        ok = [r for r in mlp if r["status"] == "ok"]
        stopped = [r for r in mlp if r["status"] != "ok"]
        cnn = [r for r in mine if r["model"] != MLP and r["status"] == "ok"]
        for j, (ax, (key, scale)) in enumerate(zip(axes, panels)):
            for rows, style in ((ok, "o-"), (stopped, "x"), (cnn, "s")):
                xs, ys = _points(rows, key, scale)
                if rows is stopped and key == "ratio_to_sgd":
                    continue
                ax.plot(xs, ys, style, ms=5, color=color, mfc="none" if rows is cnn else color,
                        label=opt if rows is ok else None)
                drawn[j] += len(xs)
    axes[0].set(xlabel="parameters", ylabel="median step time / SGD's",
                title="step time over SGD's (lines: MLP, squares: CNN)")
    axes[1].set(xlabel="parameters", ylabel="peak resident GiB",
                title="peak memory (x: stopped at a budget; dotted: budget)")
    axes[1].axhline(doc["meta"]["memory_budget_gib"], ls=":", color="grey")
    from matplotlib import ticker  # installed: pyplot() found it

    for ax, n in zip(axes, drawn):
        if n:
            ax.set(xscale="log", yscale="log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        else:
            ax.text(0.5, 0.5, "no completed run", transform=ax.transAxes, ha="center")
    return save_figure(fig, path, axes, legend=any(drawn))


if __name__ == "__main__":
    _exit_now(worker_main(sys.argv[1:]))
