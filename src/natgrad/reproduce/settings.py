"""What each part of ``natgrad reproduce`` runs, in the full, quick and tiny (test) modes, and a
run-time estimate from per-epoch costs measured on the reference machine (2 CPU cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

#: the parts, in the order of docs/RESULTS.md
PARTS = ("parity", "timing", "scaling", "capacity", "stability", "analysis", "peers",
         "families", "steps", "convergence", "race", "discussion")
PART_TITLES = {
    "parity": "1. Accuracy parity",
    "timing": "2. Time to target and step time, relative to SGD",
    "scaling": "3. Complexity: curvature cost vs layer width",
    "capacity": "4. Capacity: step time and memory of whole networks vs parameters",
    "stability": "5. Numerical stability over damping (float32)",
    "analysis": "6. Fisher analysis of a trained CNN",
    "peers": "7. Fisher analysis side by side with BackPACK and curvlinops",
    "families": "8. Whole networks: a ResNet with BatchNorm and a causal transformer",
    "steps": "9. Step time of whole networks, the optimizers taking turns",
    "convergence": "10. Training to convergence with tuned learning rates",
    "race": "11. Time to result against the optimizers people use",
    "discussion": "12. Discussion",
}
#: optimizers of the parity and timing tables; those not registered at run time are listed as
#: missing
PARITY_OPTIMIZERS = ("sgd", "adam", "kfac", "rkfac", "pkfac")
MODELS = ("mlp", "cnn", "autoencoder")


@dataclass(frozen=True)
class Settings:
    """Everything a mode fixes. ``hidden``/``limit_*`` are for the tiny test mode only.

    Attributes:
        mode: ``"full"``, ``"quick"`` or ``"tiny"``.
        seeds: seeds of the parity runs (initial weights and batch order).
        epochs: epochs per model in the parity runs.
        hidden: ``--hidden`` per model (``None``: the model's default).
        limit_train, limit_test: ``--limit-train`` / ``--limit-test`` per model (``None``: all).
        wide_hidden, wide_limit_train: the 784-1024-1024-10 step-time comparison (1 epoch).
        wide_repeats: how many times the variants of that comparison take turns.
        scaling_widths, scaling_ranks, scaling_repeats: ``natgrad bench scaling``.
        capacity_*: ``natgrad bench capacity`` (widths, CNN channels, optimizers, steps, warm-up
            steps, time budget s, memory budget GiB).
        stability_dampings, stability_seeds, stability_limit_train: ``natgrad bench stability``.
        analysis_epochs, analysis_limit_train: the CNN trained before ``natgrad analyze``.
        analysis_samples, analysis_top_k, analysis_probes: ``natgrad analyze``.
        tracking_optimizers, tracking_samples: curvature tracked over training.
        peers_samples, peers_repeats, peers_memory: the side-by-side analysis benchmark.
        family_models, family_epochs: the ResNet / transformer equal-epoch tables.
        step_models, step_rounds: the interleaved step-time measurement (rounds per model).
        convergence_models, convergence_epochs: training to convergence (cosine schedule).
        grid_epochs, validation: the learning-rate grid, on the last ``validation`` training
            samples.
        race_models, race_steps, race_trials, race_tune_steps, race_eval_every: ``natgrad
            race`` per model (steps per raced run, tuning trials and their steps, steps between
            evaluations); its seeds are ``seeds``.
    """

    mode: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: dict[str, int] = field(
        default_factory=lambda: {"mlp": 10, "cnn": 3, "autoencoder": 3})
    hidden: dict[str, str | None] = field(default_factory=dict)
    limit_train: dict[str, int | None] = field(default_factory=dict)
    limit_test: dict[str, int | None] = field(default_factory=dict)
    wide_hidden: str = "1024,1024"
    wide_limit_train: int | None = None
    wide_repeats: int = 3
    scaling_widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    scaling_ranks: tuple[int, ...] = (32, 64)
    scaling_repeats: int = 5
    capacity_widths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    capacity_cnn_channels: tuple[int, ...] | None = (128, 256, 512)
    capacity_optimizers: tuple[str, ...] = ("sgd", "adam", "kfac", "pkfac", "pkfac-every")
    capacity_steps: int = 20
    capacity_warmup: int = 3
    capacity_time_budget_s: float = 300.0
    capacity_memory_budget_gib: float = 20.0
    stability_dampings: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    stability_seeds: tuple[int, ...] = (0, 1, 2)
    stability_limit_train: int | None = None
    analysis_epochs: int = 3
    analysis_limit_train: int | None = None
    analysis_samples: int = 1000
    analysis_top_k: int = 10
    analysis_probes: int = 4
    tracking_optimizers: tuple[str, ...] = ("sgd", "kfac")
    tracking_samples: int = 256
    peers_samples: int = 1000
    peers_repeats: int = 3
    peers_memory: bool = True
    family_models: tuple[str, ...] = ("resnet8", "transformer")
    family_epochs: int = 3
    step_models: tuple[str, ...] = ("cnn", "resnet8", "transformer")
    step_rounds: int = 60
    convergence_models: tuple[str, ...] = ("cnn", "resnet8", "transformer")
    convergence_epochs: int = 30
    grid_epochs: int = 5
    validation: int = 500
    race_models: tuple[str, ...] = ("gpt", "resnet8")
    race_steps: dict[str, int] = field(default_factory=lambda: {"gpt": 2000, "resnet8": 1000})
    race_trials: int = 8
    race_tune_steps: dict[str, int] = field(
        default_factory=lambda: {"gpt": 300, "resnet8": 150})
    race_eval_every: int = 50

    def with_seeds(self, seeds: tuple[int, ...] | None) -> Settings:
        return self if seeds is None else replace(self, seeds=seeds)


FULL = Settings()

QUICK = Settings(
    mode="quick",
    seeds=(0,),
    epochs={"mlp": 2, "cnn": 2, "autoencoder": 2},
    limit_train={"cnn": 1024, "autoencoder": 1024},
    wide_limit_train=1280,
    wide_repeats=1,
    scaling_widths=(256, 512, 1024),
    scaling_ranks=(64,),
    scaling_repeats=3,
    capacity_widths=(1024, 2048, 4096),
    capacity_cnn_channels=(32, 64, 512),
    capacity_steps=5,
    capacity_warmup=1,
    capacity_time_budget_s=120.0,
    stability_dampings=(1e-1, 1e-3, 1e-5),
    stability_seeds=(0,),
    stability_limit_train=2048,
    analysis_epochs=1,
    analysis_limit_train=1024,
    analysis_samples=256,
    analysis_top_k=5,
    analysis_probes=2,
    tracking_samples=128,
    peers_samples=256,
    peers_repeats=1,
    family_epochs=1,
    step_rounds=20,
    convergence_models=("transformer",),
    convergence_epochs=2,
    grid_epochs=1,
    race_models=("gpt",),
    race_steps={"gpt": 300},
    race_trials=3,
    race_tune_steps={"gpt": 60},
    race_eval_every=25,
)

#: seconds for the tests: tiny networks on a few hundred samples
TINY = Settings(
    mode="tiny",
    seeds=(0,),
    epochs={"mlp": 1, "cnn": 1, "autoencoder": 1},
    hidden={"mlp": "16", "autoencoder": "16,4"},
    limit_train={m: 256 for m in (*MODELS, "resnet8", "transformer")},
    limit_test={m: 128 for m in (*MODELS, "resnet8", "transformer")},
    wide_hidden="32,32",
    wide_limit_train=256,
    wide_repeats=1,
    scaling_widths=(32, 64),
    scaling_ranks=(8,),
    scaling_repeats=1,
    capacity_widths=(32, 64),
    capacity_cnn_channels=(4, 8),
    capacity_optimizers=("sgd", "pkfac"),
    capacity_steps=2,
    capacity_warmup=0,
    capacity_time_budget_s=60.0,
    capacity_memory_budget_gib=8.0,
    stability_dampings=(1e-2,),
    stability_seeds=(0,),
    stability_limit_train=256,
    analysis_epochs=1,
    analysis_limit_train=256,
    analysis_samples=32,
    analysis_top_k=2,
    analysis_probes=2,
    tracking_samples=16,
    peers_samples=16,
    peers_repeats=1,
    peers_memory=False,
    family_models=("transformer",),
    family_epochs=1,
    step_models=("transformer",),
    step_rounds=3,
    convergence_models=("transformer",),
    convergence_epochs=1,
    grid_epochs=1,
    validation=64,
    race_models=("gpt",),
)

MODES = {"full": FULL, "quick": QUICK, "tiny": TINY}

# ---- run-time estimate -------------------------------------------------------------------------

#: seconds per 4,000-sample epoch with natgrad's training loop, per model and optimizer, and the
#: :func:`calibrate` time, measured together with 1 thread on the 2-core development machine
#: (torch 2.13, float32); an optimizer not listed counts as its model's "kfac" cost.
EPOCH_COST_S = {
    "mlp": {"sgd": 0.07, "adam": 0.09, "kfac": 0.5, "rkfac": 0.6, "pkfac": 0.5},
    "cnn": {"sgd": 1.8, "adam": 1.7, "adamw": 1.8, "kfac": 17.0, "rkfac": 16.0, "pkfac": 7.0,
            "pkfac+adamw": 7.0},
    "autoencoder": {"sgd": 0.5, "adam": 0.75, "kfac": 16.0, "rkfac": 5.5, "pkfac": 2.5},
    # measured with 2 threads (natgrad compare, 2 epochs)
    "resnet8": {"sgd": 4.5, "adamw": 4.7, "kfac": 20.0, "pkfac": 7.7, "pkfac+adamw": 7.1},
    "transformer": {"sgd": 1.0, "adamw": 0.9, "kfac": 2.6, "pkfac": 1.1, "pkfac+adamw": 1.2},
}
CALIBRATION_REF_S = (0.065, 0.006)  # matmul_s, eigh_s
#: rough fixed costs on the reference machine (seconds): bench scaling up to width 4096 with 5
#: repeats, natgrad analyze of the CNN on 1,000 samples (top-10, 4 probes)
FIXED_COST_S = {"scaling": 150.0, "analysis_full": 230.0, "peers": 120.0}


def calibrate() -> tuple[float, float]:
    """``(matmul_s, eigh_s)``: best of 3 of four 1024² float32 matmuls and of an eigh of 256²,
    with torch's current thread count, to compare this machine and its load with the reference.

    The matmuls scale the estimate; the eigh detects the slowdown of multi-threaded LAPACK on a
    loaded machine (threads waiting for a busy core), which can be 100× and is warned about."""
    import torch  # here, so that the table of parts and modes loads without torch (CLI help)

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=gen)
    b = torch.randn(256, 256, generator=gen)
    s = b @ b.T + 256 * torch.eye(256)
    mm = eig = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(4):
            a = (a @ a) / 32.0
        t1 = time.perf_counter()
        torch.linalg.eigh(s)
        t2 = time.perf_counter()
        mm, eig = min(mm, t1 - t0), min(eig, t2 - t1)
    return mm, eig


def _epochs_cost(model: str, optimizers: tuple[str, ...] | list[str], epochs: float,
                 train_size: int | None) -> float:
    costs = EPOCH_COST_S[model]
    per_epoch = sum(costs.get(o, costs["kfac"]) for o in optimizers)
    return per_epoch * epochs * (train_size or 4000) / 4000


def estimate(settings: Settings, parts: tuple[str, ...] | list[str],
             optimizers: tuple[str, ...] | list[str], speed: float = 1.0) -> dict[str, float]:
    """Estimated seconds per part (``speed``: this machine's calibration time / the reference's)."""
    s = settings
    est: dict[str, float] = {}
    parity = sum(_epochs_cost(m, optimizers, s.epochs[m] + 0.3, s.limit_train.get(m))
                 * len(s.seeds) for m in MODELS)  # + evaluation and start-up
    if "parity" in parts:
        est["parity"] = parity
    if "timing" in parts:
        wide = 7.0 * len(optimizers) * (s.wide_limit_train or 4000) / 4000 * s.wide_repeats
        est["timing"] = wide + (0.0 if "parity" in parts else parity / max(len(s.seeds), 1))
    if "scaling" in parts:
        w = max(s.scaling_widths)
        est["scaling"] = FIXED_COST_S["scaling"] * (w / 4096) ** 2.5 * (
            len(s.scaling_ranks) + 3) / 5 * s.scaling_repeats / 5 + 5.0
    if "capacity" in parts:
        from .capacity import estimate_capacity

        est["capacity"] = estimate_capacity(s)
    if "stability" in parts:
        runs = 3 * len(s.stability_dampings) * len(s.stability_seeds)
        est["stability"] = runs * 0.95 * (s.stability_limit_train or 4000) / 4000
    if "analysis" in parts:
        train = _epochs_cost("cnn", ("sgd",), s.analysis_epochs, s.analysis_limit_train)
        track = _epochs_cost("cnn", s.tracking_optimizers, s.analysis_epochs,
                             s.analysis_limit_train) + 3.0 * s.analysis_epochs * len(
                                 s.tracking_optimizers) * s.tracking_samples / 256
        fixed = FIXED_COST_S["analysis_full"] * (s.analysis_samples / 1000) * (
            s.analysis_top_k + 2 * s.analysis_probes) / 18
        est["analysis"] = train + track + fixed
    if "peers" in parts:
        est["peers"] = FIXED_COST_S["peers"] * (s.peers_samples / 1000) * (
            s.peers_repeats + 1 + 2 * s.peers_memory) / 6
    if "families" in parts:
        from .families import FAMILY_OPTIMIZERS

        est["families"] = sum(_epochs_cost(m, FAMILY_OPTIMIZERS, s.family_epochs + 0.3,
                                           s.limit_train.get(m))
                              for m in s.family_models) * len(s.seeds)
    if "steps" in parts:
        from .families import FAMILY_OPTIMIZERS

        # one round = one step of every optimizer; a 4,000-sample epoch has 32 steps
        est["steps"] = sum(_epochs_cost(m, FAMILY_OPTIMIZERS, (s.step_rounds + 3) / 32, None)
                           for m in s.step_models)
    if "convergence" in parts:
        from .families import CONVERGENCE_OPTIMIZERS, LR_GRID

        est["convergence"] = sum(
            _epochs_cost(m, CONVERGENCE_OPTIMIZERS, s.convergence_epochs + 1,
                         s.limit_train.get(m)) * len(s.seeds)
            + sum(_epochs_cost(m, (o,), s.grid_epochs + 0.3, s.limit_train.get(m))
                  * len(LR_GRID[o]) for o in CONVERGENCE_OPTIMIZERS)
            for m in s.convergence_models)
    if "race" in parts:
        from .race import estimate_race

        est["race"] = estimate_race(s)
    if "discussion" in parts:
        est["discussion"] = 0.0
    return {k: v * speed for k, v in est.items()}
