"""Calibrated exit confidences: per-exit temperature scaling, calibration error, reliability diagrams.

Temperature scaling (Guo et al., 2017) divides one exit's logits by a scalar ``T_k > 0`` fitted on held-out
data by minimising the negative log-likelihood. ``T_k`` never changes an exit's prediction (the argmax), only
how confident its softmax is. ``dmpo test`` with ``calibration: temperature`` fits one ``T_k`` per exit on
the calibration split *before* the early-exit thresholds are chosen, recomputes every exit's score from
``logits / T_k`` through the module's own scoring function, and reports the expected calibration error
(ECE) of every exit on the test split before and after. See ``docs/calibration.md`` for when this changes
the early-exit decisions and when it provably cannot.

Everything here is pure torch (plus torchmetrics for the ECE and matplotlib for the diagram).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.utilities import dim_zero_cat

from dmpo_lightning.files import atomic_write
from dmpo_lightning.models.exit_rules import stack_exit_logits

__all__ = [
    "CALIBRATION_METHODS",
    "ECE_BINS",
    "TEMPERATURE_RANGE",
    "CalibrationMethod",
    "ExitLogitsCollector",
    "TemperatureCalibration",
    "apply_temperatures",
    "calibrate_exits",
    "check_calibration_method",
    "exit_calibration_errors",
    "exit_nll",
    "fit_exit_temperatures",
    "fit_temperature",
    "plot_reliability",
    "reliability_bins",
]

CalibrationMethod = Literal["none", "temperature"]
"""``none``: raw softmax scores; ``temperature``: one temperature per exit fitted on the calibration split."""

CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
"""The allowed values of :data:`CalibrationMethod`."""

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (torchmetrics' default, Guo et al.)."""

TEMPERATURE_RANGE = (1e-2, 1e2)
"""Fitted temperatures are searched in this range (log-parametrised); a fit at a bound is reported."""


def check_calibration_method(method: str) -> None:
    """Refuse an unknown calibration method with the allowed ones."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"unknown calibration {method!r}; allowed: {', '.join(repr(m) for m in CALIBRATION_METHODS)}"
        )


def _check_logits_target(logits: Tensor, target: Tensor, ndim: int) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != ndim or not logits.is_floating_point():
        shape = "[N, C]" if ndim == 2 else "[N, K, C]"
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating tensor {shape}; got {got}")
    if logits.shape[0] == 0:
        raise ValueError("cannot calibrate on an empty split (0 samples)")
    if not isinstance(target, Tensor) or target.shape != logits.shape[:1]:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must be [N] = [{logits.shape[0]}] integer labels; got {got}")
    if target.is_floating_point() or bool((target < 0).any()) or bool((target >= logits.shape[-1]).any()):
        raise ValueError(f"target must hold integer labels in [0, {logits.shape[-1] - 1}]")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or infinite values; temperature scaling needs finite logits")


# ------------------------------------------------------------------------------------------ fitting
def fit_temperature(logits: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising ``NLL(softmax(logits / T), target)`` of one exit.

    L-BFGS (strong Wolfe line search) on ``log T`` in float64. The NLL is convex in ``1 / T``, so the
    minimum is unique when it exists. It does not exist when every prediction is right (the NLL falls as
    ``T -> 0``): then ``T = 1`` is kept, with a warning. The search is bounded by
    :data:`TEMPERATURE_RANGE`. If the optimiser ends worse than ``T = 1`` (it should not), ``T = 1`` is
    returned, so the fitted NLL is never above the uncalibrated one.

    Args:
        logits: ``[N, C]`` logits of one exit on held-out data.
        target: ``[N]`` labels.
        max_iter: L-BFGS iterations.

    Returns:
        The temperature (a Python float in :data:`TEMPERATURE_RANGE`).
    """
    _check_logits_target(logits, target, 2)
    if bool((logits.argmax(dim=-1) == target.to(logits.device)).all()):
        warnings.warn(
            "every held-out prediction of this exit is right, so its NLL keeps falling as T -> 0 (no finite "
            "minimiser); T = 1 is kept for it. Use a larger calibration split to calibrate it",
            stacklevel=2,
        )
        return 1.0
    lo, hi = (math.log(b) for b in TEMPERATURE_RANGE)
    # Lightning runs test epochs under inference mode: leave it (and no_grad) for this small optimisation,
    # on copies of the inputs, since inference tensors cannot be saved for backward
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to(torch.float64).clone()
        y = target.detach().long().to(z.device).clone()
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
    t = math.exp(min(max(float(log_t.detach()), lo), hi))
    if exit_nll(z[:, None], y, torch.tensor([t]))[0] > exit_nll(z[:, None], y, torch.ones(1))[0]:
        t = 1.0
    return t


def fit_exit_temperatures(logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    """One temperature per exit (:func:`fit_temperature` on each exit's logits independently).

    Args:
        logits: ``[N, K, C]`` or a list of K tensors ``[N, C]``.
        target: ``[N]`` labels.

    Returns:
        ``[K]`` temperatures (float64, CPU).
    """
    z = stack_exit_logits(logits)
    _check_logits_target(z, target, 3)
    return torch.tensor([fit_temperature(z[:, k], target) for k in range(z.shape[1])], dtype=torch.float64)


def apply_temperatures(logits: Tensor | Sequence[Tensor], temperatures: Tensor | Sequence[float]) -> Tensor:
    """``logits[:, k] / T_k`` for every exit (float32, or float64 for float64 logits).

    Args:
        logits: ``[N, K, C]`` or a list of K tensors ``[N, C]``.
        temperatures: ``[K]`` positive finite temperatures.

    Returns:
        Scaled logits ``[N, K, C]``.
    """
    z = stack_exit_logits(logits)
    t = torch.as_tensor(temperatures, dtype=torch.float64).flatten()
    if t.numel() != z.shape[1]:
        raise ValueError(f"need one temperature per exit (K = {z.shape[1]}); got {t.numel()}")
    if not bool(torch.isfinite(t).all() & (t > 0).all()):
        raise ValueError(f"temperatures must be finite and > 0; got {t.tolist()}")
    # T is rounded to float32 (the dtype dmpo predict keeps it in) and the division is done in at least
    # float32, exactly as MultiExitViT.forward_early_exit does, so test and predict take the same decisions
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / t.to(device=z.device, dtype=torch.float32)[None, :, None]


def exit_nll(logits: Tensor | Sequence[Tensor], target: Tensor, temperatures: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood of every exit, optionally after temperature scaling (float64, ``[K]``)."""
    z = stack_exit_logits(logits).to(torch.float64)
    if temperatures is not None:
        z = apply_temperatures(z, temperatures)
    y = target.long().to(z.device)
    return torch.stack([F.cross_entropy(z[:, k], y) for k in range(z.shape[1])]).cpu()


# -------------------------------------------------------------------------------------------- ECE
def exit_calibration_errors(
    logits: Tensor | Sequence[Tensor], target: Tensor, n_bins: int = ECE_BINS
) -> Tensor:
    """Expected calibration error of every exit: torchmetrics' ``multiclass_calibration_error`` (l1).

    The softmax is taken here (float32) and probabilities are passed to torchmetrics, which would otherwise
    skip its own softmax for logits that happen to lie in ``[0, 1]``.

    Args:
        logits: ``[N, K, C]`` or a list of K tensors ``[N, C]``.
        target: ``[N]`` labels.
        n_bins: Equal-width confidence bins.

    Returns:
        ``[K]`` ECE values in ``[0, 1]`` (float64, CPU).
    """
    z = stack_exit_logits(logits)
    _check_logits_target(z, target, 3)
    probs = z.float().softmax(dim=-1)
    y = target.long().to(z.device)
    return torch.tensor(
        [
            float(multiclass_calibration_error(probs[:, k], y, z.shape[2], n_bins=n_bins, norm="l1"))
            for k in range(z.shape[1])
        ],
        dtype=torch.float64,
    )


def reliability_bins(logits: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and sample count of one exit (what a reliability diagram shows).

    Bins are torchmetrics' (``linspace(0, 1, n_bins + 1)``, ``bucketize(right=True)``), which puts a
    confidence of exactly 1.0 in an extra bin of its own, so there are ``n_bins + 1`` bins and
    ``sum |accuracy - confidence| * count / N`` equals :func:`exit_calibration_errors` exactly.

    Args:
        logits: ``[N, C]`` of one exit.
        target: ``[N]`` labels.
        n_bins: Equal-width bins.

    Returns:
        ``{"edges": [n_bins + 1], "confidence": [n_bins + 1], "accuracy": [n_bins + 1],
        "count": [n_bins + 1]}``; empty bins have confidence and accuracy 0 and count 0.
    """
    _check_logits_target(logits, target, 2)
    conf, pred = logits.float().softmax(dim=-1).max(dim=-1)
    correct = (pred == target.to(pred.device)).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = torch.bucketize(conf, edges, right=True) - 1  # conf == 1.0 -> bin n_bins, as in torchmetrics
    count = torch.zeros(n_bins + 1, dtype=conf.dtype, device=conf.device).index_add_(
        0, idx, torch.ones_like(conf)
    )
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    safe = count.clamp(min=1)
    return {
        "edges": edges.tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
        "count": count.tolist(),
    }


# --------------------------------------------------------------------------------- the whole step
@dataclass(frozen=True)
class TemperatureCalibration:
    """Temperatures fitted on the calibration split and their effect on the test split.

    Attributes:
        temperatures: ``[K]`` one per exit.
        nll_before: ``[K]`` calibration-split NLL with ``T = 1``.
        nll_after: ``[K]`` calibration-split NLL with the fitted temperatures.
        ece_before: ``[K]`` test-split ECE of the raw softmax.
        ece_after: ``[K]`` test-split ECE after temperature scaling.
        reliability_before: Per exit, :func:`reliability_bins` on test before.
        reliability_after: Per exit, the same after.
        n_bins: ECE bins.
    """

    temperatures: Tensor
    nll_before: Tensor
    nll_after: Tensor
    ece_before: Tensor
    ece_after: Tensor
    reliability_before: list[dict[str, list[float]]]
    reliability_after: list[dict[str, list[float]]]
    n_bins: int = ECE_BINS

    def to_report(self) -> dict[str, Any]:
        """The ``calibration`` entry of ``report.json`` (plain JSON types)."""
        lo, hi = TEMPERATURE_RANGE
        return {
            "method": "temperature",
            "fitted_on": "calibration split (NLL per exit, before thresholds are chosen)",
            "temperatures": self.temperatures.tolist(),
            "temperature_at_bound": [bool(t <= lo * 1.0001 or t >= hi * 0.9999) for t in self.temperatures],
            "calibration_nll_before": self.nll_before.tolist(),
            "calibration_nll_after": self.nll_after.tolist(),
            "ece": {"split": "test", "n_bins": self.n_bins, "norm": "l1"},
            "ece_before": self.ece_before.tolist(),
            "ece_after": self.ece_after.tolist(),
            "reliability": {"before": self.reliability_before, "after": self.reliability_after},
        }


def calibrate_exits(
    cal_logits: Tensor,
    cal_target: Tensor,
    test_logits: Tensor,
    test_target: Tensor,
    score_fn: Callable[[list[Tensor]], tuple[Tensor, Tensor]],
    n_bins: int = ECE_BINS,
) -> tuple[TemperatureCalibration, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Fit per-exit temperatures on calibration logits; rescore both splits through ``score_fn``.

    Args:
        cal_logits: ``[n, K, C]`` calibration-split logits.
        cal_target: ``[n]`` calibration labels.
        test_logits: ``[N, K, C]`` test-split logits.
        test_target: ``[N]`` test labels.
        score_fn: The scoring function of the exit rule, called with a list of K ``[B, C]`` scaled logits
            and returning ``(scores [B, K], preds [B, K])`` (``exit_rules.exit_scores`` of a rule).
        n_bins: ECE bins.

    Returns:
        ``(calibration, (cal_scores, cal_preds), (test_scores, test_preds))``.
    """
    temperatures = fit_exit_temperatures(cal_logits, cal_target)
    lo, hi = TEMPERATURE_RANGE
    at_bound = [k + 1 for k, t in enumerate(temperatures.tolist()) if t <= lo * 1.0001 or t >= hi * 0.9999]
    if at_bound:
        warnings.warn(
            f"the temperature of exit(s) {at_bound} stopped at a bound of {TEMPERATURE_RANGE}: the "
            "calibration split is (nearly) separable or uninformative for them, so their calibrated scores "
            "saturate and tie; use a larger calibration split or calibration: none",
            stacklevel=2,
        )
    cal_scaled = apply_temperatures(cal_logits, temperatures)
    test_scaled = apply_temperatures(test_logits, temperatures)
    num_exits = cal_logits.shape[1]
    result = TemperatureCalibration(
        temperatures=temperatures,
        nll_before=exit_nll(cal_logits, cal_target),
        nll_after=exit_nll(cal_logits, cal_target, temperatures),
        ece_before=exit_calibration_errors(test_logits, test_target, n_bins),
        ece_after=exit_calibration_errors(test_scaled, test_target, n_bins),
        reliability_before=[
            reliability_bins(test_logits[:, k], test_target, n_bins) for k in range(num_exits)
        ],
        reliability_after=[
            reliability_bins(test_scaled[:, k], test_target, n_bins) for k in range(num_exits)
        ],
        n_bins=n_bins,
    )
    cal_out = score_fn(list(cal_scaled.unbind(1)))
    test_out = score_fn(list(test_scaled.unbind(1)))
    return result, cal_out, test_out


# ------------------------------------------------------------------------------------ collecting
class ExitLogitsCollector(Metric):
    """Collects per-sample logits of every exit (index, logits ``[B, K, C]``, target) over batches and ranks.

    Like :class:`~dmpo_lightning.evaluation.metrics.ExitOutputsCollector`, :meth:`compute` sorts by sample
    index and drops the duplicates a ``DistributedSampler`` pads with, so its rows line up with that
    collector's. Memory: ``N * K * C`` floats per split.

    Args:
        kwargs: Forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    index: list[Tensor]
    logits: list[Tensor]
    target: list[Tensor]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("index", "logits", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, logits: Tensor, target: Tensor) -> None:
        """Store a batch: ``index [B]``, ``logits [B, K, C]``, ``target [B]``."""
        if logits.ndim != 3 or index.shape != logits.shape[:1] or target.shape != logits.shape[:1]:
            raise ValueError(
                f"need index [B], logits [B, K, C] and target [B]; got {tuple(index.shape)}, "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        self.index.append(index.detach().long())
        self.logits.append(logits.detach())
        self.target.append(target.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """``index [N]``, ``logits [N, K, C]``, ``target [N]``, sorted by index, unique."""
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("ExitLogitsCollector.compute() called before any update: nothing collected")
        index, logits, target = dim_zero_cat(self.index), dim_zero_cat(self.logits), dim_zero_cat(self.target)
        index, order = torch.sort(index, stable=True)
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        order = order[keep]
        return {"index": index[keep], "logits": logits[order], "target": target[order]}


# ---------------------------------------------------------------------------------------- diagram
def plot_reliability(path: str | os.PathLike[str], calibration: Mapping[str, Any]) -> str:
    """Reliability diagram PNG: one panel per exit, accuracy vs confidence per bin, before and after.

    Args:
        path: Output ``.png`` file (written atomically).
        calibration: The ``calibration`` entry of ``report.json`` (:meth:`TemperatureCalibration.to_report`).

    Returns:
        The path written.
    """
    before, after = calibration["reliability"]["before"], calibration["reliability"]["after"]
    k = len(before)
    fig = Figure(figsize=(3.2 * k, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    for i in range(k):
        ax = fig.add_subplot(1, k, i + 1)
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
        for bins, color, name, ece in (
            (before[i], "tab:red", "before", calibration["ece_before"][i]),
            (after[i], "tab:blue", f"T = {calibration['temperatures'][i]:.2f}", calibration["ece_after"][i]),
        ):
            pts = [
                (c, a)
                for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"], strict=True)
                if n
            ]
            ax.plot(
                [c for c, _ in pts],
                [a for _, a in pts],
                "o-",
                color=color,
                ms=3,
                lw=1.2,
                label=f"{name}: ECE {100 * ece:.1f}%",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"exit {i + 1}", fontsize=9)
        ax.set_xlabel("confidence (max softmax)", fontsize=8)
        if i == 0:
            ax.set_ylabel("test accuracy in bin", fontsize=8)
        ax.legend(loc="upper left", fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Reliability on the test split ({calibration['ece']['n_bins']} bins)", fontsize=10)
    fig.tight_layout()
    return str(atomic_write(path, lambda f: fig.savefig(f, format="png")))
