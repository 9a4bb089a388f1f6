"""Fisher analysis side by side: natgrad against BackPACK and curvlinops on the same models.

The peers are an optional benchmark extra, never a runtime dependency (install them as in
``benchmarks/requirements-peers.txt``); a library that does not import is reported as
``not installed`` and its rows are skipped.

Cases: the MLP 784-64-64-10 (55,050 parameters) and a small CNN (4,874 parameters, conv with
stride and padding, max-pooling), ``samples`` images of the embedded ``mnist5k`` set, the exact
(type-2) Fisher of the cross-entropy, mean over samples, float32. Quantities:

==============  ===========================================================================
``trace``       exact ``tr F`` (natgrad ``exact_trace``; BackPACK ``DiagGGNExact`` summed)
``diagonal``    exact ``diag F`` (natgrad ``ExactFisher.diagonal``; BackPACK ``DiagGGNExact``)
``top_k``       the ``k`` largest eigenvalues to relative residual ``tol`` (natgrad
                ``lanczos_topk`` on :class:`~natgrad.fisher.rows.RowFisher` when the rows
                fit in memory; peers: their GGN-vector product + ``scipy eigsh(tol)``)
``hutchinson``  Hutchinson trace with ``matvecs`` Rademacher probes
``hutchpp``     Hutch++ with ``matvecs`` products
``kfac``        the K-FAC (KFLR, type-2) factors of every layer (no inverse)
==============  ===========================================================================

Each quantity is timed from the model and data (operators built inside the timing), the
libraries interleaved (repeat ``i`` of every library before repeat ``i + 1``), median reported;
peak memory is the rise of the resident set (``VmHWM`` after resetting it, Linux) in a fresh
subprocess per measurement; errors are against the float64 reference of
:mod:`natgrad.bench.reference`: relative 2-norm error of the diagonal / eigenvalues, relative
error of traces, and for K-FAC the relative Frobenius error of each layer's weight block
``A_w ⊗ G`` (worst layer), after mapping each library to natgrad's convention (BackPACK's
conv ``G`` carries an extra factor ``T``, its docstring says so; we divide it out).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..report import format_table

LIBRARIES = ("natgrad", "backpack", "curvlinops")
QUANTITIES = ("trace", "diagonal", "top_k", "hutchinson", "hutchpp", "kfac")
EXACT = ("trace", "diagonal", "top_k", "kfac")  # quantities with a ≤ 1e-6 error target


@dataclass(frozen=True)
class Settings:
    samples: int = 1000
    repeats: int = 3
    top_k: int = 5
    tol: float = 1e-4
    matvecs: int = 60
    threads: int | None = 1
    memory: bool = True
    seed: int = 0
    chunk: int = 1000  # samples per forward pass, every library


# ---------------------------------------------------------------------- cases
def small_cnn() -> nn.Sequential:
    """4,874 parameters: conv 5x5 s2 p2 (8) → ReLU → conv 5x5 s2 p2 (16) → ReLU → max-pool 2 →
    Linear(144, 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    )


def mlp() -> nn.Sequential:
    """55,050 parameters: Flatten → Linear(784, 64) → ReLU → Linear(64, 64) → ReLU → Linear(64,
    10)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64),
                         nn.ReLU(), nn.Linear(64, 10))


MODELS: dict[str, Callable[[], nn.Sequential]] = {"mlp": mlp, "cnn5k": small_cnn}


def build_case(name: str, samples: int, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """``(model in eval mode, X, y)``: seeded weights, the first ``samples`` mnist5k images."""
    from ..data import load_dataset

    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    train, _ = load_dataset("mnist5k")
    return model, train.x[:samples].float(), train.y[:samples]


def peer_versions() -> dict[str, str | None]:
    """Installed version of each library, ``None`` when it does not import."""
    out: dict[str, str | None] = {}
    for lib, module in (("natgrad", "natgrad"), ("backpack", "backpack"),
                        ("curvlinops", "curvlinops")):
        try:
            mod = __import__(module)
        except Exception:  # ImportError, or a broken dependency (e.g. torchvision)
            out[lib] = None
            continue
        out[lib] = str(getattr(mod, "__version__", "installed"))
    return out


# ---------------------------------------------------------------------- natgrad
def _ng_op(model: nn.Module, X: Tensor, y: Tensor, s: Settings):
    from ..fisher import ExactFisher

    return ExactFisher(model, (X, y), "cross_entropy", chunk_size=s.chunk, cache=True,
                       cache_bytes=1 << 30)


def _ng_fast(model: nn.Module, X: Tensor, y: Tensor, s: Settings):
    """The rows in memory when they fit 1 GiB, else the cached jvp/vjp operator."""
    from ..fisher.rows import RowFisher

    op = _ng_op(model, X, y, s)
    return RowFisher.from_ggn(op, max_bytes=1 << 30) or op


def natgrad_trace(model, X, y, s: Settings) -> float:
    from ..fisher import exact_trace

    return exact_trace(_ng_op(model, X, y, s)).value


def natgrad_diagonal(model, X, y, s: Settings) -> Tensor:
    return _ng_op(model, X, y, s).diagonal()


def natgrad_top_k(model, X, y, s: Settings) -> Tensor:
    from ..fisher import lanczos_topk

    return lanczos_topk(_ng_fast(model, X, y, s), k=s.top_k, tol=s.tol, seed=s.seed).values


def natgrad_hutchinson(model, X, y, s: Settings) -> float:
    from ..fisher import hutchinson_trace

    return hutchinson_trace(_ng_fast(model, X, y, s), probes=s.matvecs, seed=s.seed,
                            batch=s.matvecs).value


def natgrad_hutchpp(model, X, y, s: Settings) -> float:
    from ..fisher import hutchpp_trace

    return hutchpp_trace(_ng_fast(model, X, y, s), matvecs=s.matvecs, seed=s.seed).value


def natgrad_kfac(model, X, y, s: Settings) -> list[tuple[Tensor, Tensor]]:
    from ..fisher import KFACOperator

    K = KFACOperator.from_data(model, (X, y), "cross_entropy", fisher="exact",
                               strategy="cholesky", chunk_size=s.chunk)
    out = []
    for name, (A, G) in K.factors.items():
        Ad = A.to_dense()
        if K.layers[name].has_bias:
            Ad = Ad[:-1, :-1]
        out.append((Ad, G.to_dense()))
    return out


# ---------------------------------------------------------------------- BackPACK
def _bp_backward(model: nn.Module, X: Tensor, y: Tensor, extension) -> nn.Module:
    from backpack import backpack, extend

    m = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss())(m(X), y)
    with backpack(extension):
        loss.backward()
    return m


def backpack_diagonal(model, X, y, s: Settings) -> Tensor:
    from backpack.extensions import DiagGGNExact

    m = _bp_backward(model, X, y, DiagGGNExact())
    return torch.cat([p.diag_ggn_exact.reshape(-1) for p in m.parameters()])


def backpack_trace(model, X, y, s: Settings) -> float:
    from backpack.extensions import DiagGGNExact

    m = _bp_backward(model, X, y, DiagGGNExact())
    return float(sum(p.diag_ggn_exact.sum() for p in m.parameters()))


def _bp_product(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Callable[[Tensor], Tensor], int]:
    """BackPACK's GGN-vector product (``ggn_vector_product_from_plist``, one forward kept)."""
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    m = copy.deepcopy(model)
    params = list(m.parameters())
    out = m(X)
    loss = nn.CrossEntropyLoss()(out, y)
    sizes = [p.numel() for p in params]

    def mv(v: Tensor) -> Tensor:
        parts = [t.reshape(p.shape) for t, p in zip(v.split(sizes), params)]
        res = ggn_vector_product_from_plist(loss, out, params, parts)
        return torch.cat([r.reshape(-1) for r in res]).detach()

    return mv, sum(sizes)


def _eigsh_top(mv: Callable[[Tensor], Tensor], dim: int, s: Settings) -> Tensor:
    from scipy.sparse.linalg import LinearOperator, eigsh

    def f(x: np.ndarray) -> np.ndarray:
        return mv(torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1))).double().numpy()

    op = LinearOperator((dim, dim), matvec=f, dtype=np.float64)
    vals = eigsh(op, k=s.top_k, which="LA", tol=s.tol, return_eigenvectors=False)
    return torch.from_numpy(np.sort(vals)[::-1].copy())


def backpack_top_k(model, X, y, s: Settings) -> Tensor:
    mv, dim = _bp_product(model, X, y)
    return _eigsh_top(mv, dim, s)


def backpack_hutchinson(model, X, y, s: Settings) -> float:
    """BackPACK offers the product, not the estimator: the same Rademacher loop."""
    mv, dim = _bp_product(model, X, y)
    gen = torch.Generator().manual_seed(s.seed)
    total = 0.0
    for _ in range(s.matvecs):
        v = (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).float()
        total += float(v @ mv(v))
    return total / s.matvecs


def backpack_kfac(model, X, y, s: Settings) -> list[tuple[Tensor, Tensor]]:
    from backpack.extensions import KFLR

    m = _bp_backward(model, X, y, KFLR())
    out = []
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    for mod in layers:
        G, A = mod.weight.kflr  # conv: G is the bias GGN (reference convention "bias")
        out.append((A, G))
    return out


# ---------------------------------------------------------------------- curvlinops
def _batches(X: Tensor, y: Tensor, s: Settings) -> list[tuple[Tensor, Tensor]]:
    return [(X[i:i + s.chunk], y[i:i + s.chunk]) for i in range(0, len(X), s.chunk)]


def _cl_ggn(model: nn.Module, X: Tensor, y: Tensor, s: Settings):
    from curvlinops import GGNLinearOperator

    m = copy.deepcopy(model)
    return GGNLinearOperator(m, nn.CrossEntropyLoss(), list(m.parameters()), _batches(X, y, s),
                             check_deterministic=False)


def curvlinops_top_k(model, X, y, s: Settings) -> Tensor:
    A = _cl_ggn(model, X, y, s)
    return _eigsh_top(lambda v: A @ v, A.shape[0], s)


def curvlinops_hutchinson(model, X, y, s: Settings) -> float:
    from curvlinops import hutchinson_trace

    torch.manual_seed(s.seed)
    return float(hutchinson_trace(_cl_ggn(model, X, y, s), s.matvecs))


def curvlinops_hutchpp(model, X, y, s: Settings) -> float:
    from curvlinops import hutchpp_trace

    torch.manual_seed(s.seed)
    return float(hutchpp_trace(_cl_ggn(model, X, y, s), s.matvecs))


def curvlinops_kfac(model, X, y, s: Settings) -> list[tuple[Tensor, Tensor]]:
    from curvlinops import FisherType, KFACLinearOperator

    m = copy.deepcopy(model)
    K = KFACLinearOperator(m, nn.CrossEntropyLoss(), list(m.parameters()), _batches(X, y, s),
                           fisher_type=FisherType.TYPE2, separate_weight_and_bias=False,
                           check_deterministic=False)
    K.compute_kronecker_factors()
    out = []
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            A = K._input_covariances[name]  # no public accessor in curvlinops 3.0
            if mod.bias is not None:
                A = A[:-1, :-1]
            out.append((A, K._gradient_covariances[name]))
    return out


IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("natgrad", "trace"): natgrad_trace,
    ("natgrad", "diagonal"): natgrad_diagonal,
    ("natgrad", "top_k"): natgrad_top_k,
    ("natgrad", "hutchinson"): natgrad_hutchinson,
    ("natgrad", "hutchpp"): natgrad_hutchpp,
    ("natgrad", "kfac"): natgrad_kfac,
    ("backpack", "trace"): backpack_trace,
    ("backpack", "diagonal"): backpack_diagonal,
    ("backpack", "top_k"): backpack_top_k,
    ("backpack", "hutchinson"): backpack_hutchinson,
    ("backpack", "kfac"): backpack_kfac,
    ("curvlinops", "top_k"): curvlinops_top_k,
    ("curvlinops", "hutchinson"): curvlinops_hutchinson,
    ("curvlinops", "hutchpp"): curvlinops_hutchpp,
    ("curvlinops", "kfac"): curvlinops_kfac,
}


# ---------------------------------------------------------------------- references and errors
def reference(model: nn.Module, X: Tensor, s: Settings) -> dict[str, Any]:
    """The float64 quantities (:class:`~natgrad.bench.reference.SequentialReference`)."""
    from .reference import SequentialReference

    ref = SequentialReference(model, X)
    diag = ref.diagonal()
    return {"diagonal": diag, "trace": float(diag.sum()),
            "top_k": ref.top_eigenvalues(s.top_k), "kfac": ref.kfac_factors(),
            "kfac_bias": ref.kfac_factors("bias")}


def _kron_error(A: Tensor, G: Tensor, A0: Tensor, G0: Tensor) -> float:
    """``‖A⊗G − A0⊗G0‖_F / ‖A0⊗G0‖_F`` without forming either product."""
    A, G, A0, G0 = (t.detach().double() for t in (A, G, A0, G0))
    nn_ = A.pow(2).sum() * G.pow(2).sum()
    rr = A0.pow(2).sum() * G0.pow(2).sum()
    nr = (A * A0).sum() * (G * G0).sum()
    return float((nn_ + rr - 2 * nr).clamp_min(0).sqrt() / rr.sqrt())


def error(quantity: str, value: Any, ref: dict[str, Any], lib: str = "natgrad") -> float:
    """Relative error of a library's result against the float64 reference (estimators: of the
    estimate against the exact trace; BackPACK's K-FAC: against its own conv convention)."""
    if quantity in ("trace", "hutchinson", "hutchpp"):
        return abs(float(value) - ref["trace"]) / abs(ref["trace"])
    if quantity in ("diagonal", "top_k"):
        v = torch.as_tensor(value).double().reshape(-1)
        r = ref[quantity].double()
        return float((v - r).norm() / r.norm())
    return max(_kron_error(A, G, A0[:-1, :-1] if A0.shape[0] == A.shape[0] + 1 else A0, G0)
               for (A, G), (A0, G0) in zip(value, ref["kfac_bias" if lib == "backpack"
                                                       else "kfac"]))


# ---------------------------------------------------------------------- measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _probe_memory(lib: str, quantity: str, model_name: str, s: Settings) -> dict[str, Any]:
    """In this (fresh) process: the rise of the resident set during one computation, MB."""
    if s.threads:
        torch.set_num_threads(s.threads)
    model, X, y = build_case(model_name, s.samples, s.seed)
    fn = IMPLEMENTATIONS[(lib, quantity)]
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        reset = True
    except OSError:
        reset = False
    fn(model, X, y, s)
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "hwm_reset": reset}


def measure_memory(lib: str, quantity: str, model_name: str, s: Settings) -> float | None:
    """Peak resident-set rise (MB) of one computation, in a fresh subprocess."""
    args = json.dumps({"lib": lib, "quantity": quantity, "model": model_name,
                       "settings": asdict(s)})
    proc = subprocess.run([sys.executable, "-m", "natgrad.bench.analysis", args],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    if proc.returncode != 0:
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def run_benchmark(s: Settings, models: tuple[str, ...] = tuple(MODELS),
                  quantities: tuple[str, ...] = QUANTITIES,
                  progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """The side-by-side measurements as a JSON-ready dict (see the module docstring)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    versions = peer_versions()
    result: dict[str, Any] = {
        "settings": asdict(s), "versions": versions, "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_before": os.getloadavg()},
        "cases": {},
    }
    for name in models:
        model, X, y = build_case(name, s.samples, s.seed)
        progress(f"{name}: float64 reference")
        ref = reference(model, X, s)
        case: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()),
                                "reference_trace": ref["trace"], "quantities": {}}
        for q in quantities:
            libs = [lib for lib in LIBRARIES if (lib, q) in IMPLEMENTATIONS]
            rows: dict[str, Any] = {}
            for lib in LIBRARIES:
                if (lib, q) not in IMPLEMENTATIONS:
                    rows[lib] = {"status": "not offered"}
                elif versions[lib] is None:
                    rows[lib] = {"status": "not installed"}
            run = [lib for lib in libs if versions[lib] is not None]
            times: dict[str, list[float]] = {lib: [] for lib in run}
            values: dict[str, Any] = {}
            for lib in run:  # warm-up (lazy imports, first-call allocations), untimed
                IMPLEMENTATIONS[(lib, q)](model, X, y, s)
            for _ in range(s.repeats):  # interleaved
                for lib in run:
                    progress(f"{name}: {q} / {lib}")
                    t0 = time.perf_counter()
                    values[lib] = IMPLEMENTATIONS[(lib, q)](model, X, y, s)
                    times[lib].append(time.perf_counter() - t0)
            for lib in run:
                rows[lib] = {"status": "ok", "time_s": statistics.median(times[lib]),
                             "times_s": times[lib], "error": error(q, values[lib], ref, lib)}
                if s.memory:
                    progress(f"{name}: {q} / {lib} (memory)")
                    rows[lib]["peak_mb"] = measure_memory(lib, q, name, s)
            case["quantities"][q] = rows
        result["cases"][name] = case
    result["machine"]["load_after"] = os.getloadavg()
    return result


# ---------------------------------------------------------------------- reporting
_LABELS = {"trace": "exact trace", "diagonal": "exact diagonal", "top_k": "top-{k} eigenvalues",
           "hutchinson": "Hutchinson trace ({m} products)",
           "hutchpp": "Hutch++ trace ({m} products)", "kfac": "K-FAC factors (type-2)"}


def _cell(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return row.get("status", "")
    mem = row.get("peak_mb")
    mem_s = f", {mem:.0f} MB" if mem is not None else ""
    return f"{row['time_s']:.3g} s{mem_s} (err {row['error']:.1e})"


def table(result: dict[str, Any], markdown: bool = True) -> str:
    """Per case and quantity, each library's time, peak memory and error, and natgrad's time
    over the fastest peer's: a markdown table (or plain text)."""
    s = result["settings"]
    headers = ["model", "quantity", *LIBRARIES, "natgrad / fastest peer"]
    rows = []
    for name, case in result["cases"].items():
        for q, libs in case["quantities"].items():
            label = _LABELS[q].format(k=s["top_k"], m=s["matvecs"])
            peers = [r["time_s"] for lib, r in libs.items()
                     if lib != "natgrad" and r.get("status") == "ok"]
            ng = libs.get("natgrad", {})
            ratio = (f"{ng['time_s'] / min(peers):.2f}" if peers and ng.get("status") == "ok"
                     else "–")
            rows.append([f"{name} ({case['params']:,})", label,
                         *(_cell(libs.get(lib, {})) for lib in LIBRARIES), ratio])
    if not markdown:
        return format_table(headers, rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def summary(result: dict[str, Any]) -> str:
    """One line on the machine and versions."""
    m, v = result["machine"], result["versions"]
    vs = ", ".join(f"{k} {v[k] or 'not installed'}" for k in LIBRARIES)
    return (f"torch {result['torch']}, {m['threads']} thread(s), load "
            f"{m['load_before'][0]:.2f} → {m['load_after'][0]:.2f}; {vs}; "
            f"{result['settings']['samples']} mnist5k samples, median of "
            f"{result['settings']['repeats']}")


if __name__ == "__main__":  # a memory probe: python -m natgrad.bench.analysis '<json>'
    a = json.loads(sys.argv[1])
    print(json.dumps(_probe_memory(a["lib"], a["quantity"], a["model"], Settings(**a["settings"]))))
