"""Two-phase loss-weight schedule of DMPO: a pure object mapping an epoch to per-exit loss weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from dmpo_lightning.options import OptionGroup

__all__ = ["PRESETS", "ScheduleOptions", "TwoPhaseSchedule", "WeightSpec", "preset_weights"]

Preset = Literal["depth_increasing", "uniform", "early_emphasis"]
# A runtime alias used in signatures jsonargparse parses; left as typing.Union rather than rewritten to X | Y.
WeightSpec = Union[Preset, Sequence[float]]  # noqa: UP007
PRESETS = ("depth_increasing", "uniform", "early_emphasis")


@dataclass(frozen=True)
class ScheduleOptions(OptionGroup):
    """DMPO's two-phase loss-weight schedule: ``DMPOModule(schedule=...)``, :class:`TwoPhaseSchedule`.

    In a config: ``model.init_args.schedule.switch_epoch: 5``. Equal phases switch the schedule off (the
    ablation "no two-phase schedule").
    """

    weight_phase1: WeightSpec = "depth_increasing"
    """Loss weights before ``switch_epoch``: ``depth_increasing`` (k / K), ``uniform``, ``early_emphasis``
    ((K - k + 1) / K) or one non-negative weight per exit."""
    weight_phase2: WeightSpec = "uniform"
    """Loss weights from ``switch_epoch`` on (same choices)."""
    switch_epoch: int | None = None
    """First epoch of phase 2 (``None`` = half of ``max_epochs``)."""
    ramp_epochs: int = 0
    """Epochs over which the weights move linearly from phase 1 to phase 2 (0 = hard switch)."""


def preset_weights(spec: WeightSpec, num_exits: int, *, name: str = "weights") -> tuple[float, ...]:
    """Per-exit weights from a preset name or an explicit list.

    Args:
        spec: ``depth_increasing`` (k / K), ``uniform`` (all 1), ``early_emphasis`` ((K - k + 1) / K), or an
            explicit list with one non-negative weight per exit.
        num_exits: K.
        name: The option's name, used in error messages.

    Returns:
        K weights.

    Raises:
        ValueError: For an unknown preset, a list of the wrong length, a negative or non-finite weight,
            or all weights zero.

    Examples:
        >>> preset_weights("depth_increasing", 4)
        (0.25, 0.5, 0.75, 1.0)
        >>> preset_weights("early_emphasis", 4)
        (1.0, 0.75, 0.5, 0.25)
        >>> preset_weights([1, 2, 3], 3)
        (1.0, 2.0, 3.0)
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if isinstance(spec, str):
        if spec == "depth_increasing":
            weights = tuple((k + 1) / num_exits for k in range(num_exits))
        elif spec == "uniform":
            weights = tuple(1.0 for _ in range(num_exits))
        elif spec == "early_emphasis":
            weights = tuple((num_exits - k) / num_exits for k in range(num_exits))
        else:
            raise ValueError(
                f"{name}={spec!r} is not a preset; allowed: {', '.join(PRESETS)} or a list of floats"
            )
    else:
        weights = tuple(float(w) for w in spec)
        if len(weights) != num_exits:
            raise ValueError(
                f"{name} has {len(weights)} entries but the model has {num_exits} exits; "
                "give one weight per exit"
            )
        bad = [w for w in weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"{name} must be finite and >= 0; got {list(weights)}")
        if not any(w > 0 for w in weights):
            raise ValueError(f"{name} are all zero; at least one exit needs a positive weight")
    return weights


class TwoPhaseSchedule:
    """Epoch -> per-exit loss weights, switching from phase 1 to phase 2 (optionally over a linear ramp).

    Phase 1 (``epoch < switch_epoch``) lets deep exits learn discrimination first while early stages stay
    representative; phase 2 pushes discrimination towards the early exits.

    Args:
        num_exits: K.
        options: The :class:`ScheduleOptions` (or a mapping of them): the phases' weights, the switch epoch
            (``None`` = ``max_epochs // 2``) and the ramp: at epoch ``switch_epoch + i`` the mix is
            ``(i + 1) / (ramp_epochs + 1)`` of phase 2.
        max_epochs: Length of training, used to resolve and check ``switch_epoch`` (``None`` = unknown).

    Raises:
        ValueError: For invalid weights (see :func:`preset_weights`), a negative switch or ramp, a switch
            at or after the last epoch while the two phases differ (phase 2 would never run), or a ramp that
            ends after the last epoch (phase 2's weights would never be reached).

    Examples:
        >>> s = TwoPhaseSchedule(4, ScheduleOptions(switch_epoch=2), max_epochs=4)
        >>> s.weights(0), s.weights(1)
        ((0.25, 0.5, 0.75, 1.0), (0.25, 0.5, 0.75, 1.0))
        >>> s.weights(2)
        (1.0, 1.0, 1.0, 1.0)
        >>> TwoPhaseSchedule(2, {"switch_epoch": 1, "ramp_epochs": 1}, max_epochs=4).weights(1)
        (0.75, 1.0)
    """

    def __init__(
        self,
        num_exits: int,
        options: ScheduleOptions | Mapping[str, Any] | None = None,
        max_epochs: int | None = None,
    ) -> None:
        o = self.options = ScheduleOptions.coerce(options, name="schedule")
        switch_epoch, ramp_epochs = o.switch_epoch, o.ramp_epochs
        self.num_exits = num_exits
        self.phase1 = preset_weights(o.weight_phase1, num_exits, name="weight_phase1")
        self.phase2 = preset_weights(o.weight_phase2, num_exits, name="weight_phase2")
        if max_epochs is not None and max_epochs < 1:
            max_epochs = None  # Lightning's max_epochs=-1 means "unbounded"
        if switch_epoch is None:
            if max_epochs is None:
                raise ValueError(
                    "schedule.switch_epoch is null (= half of max_epochs) but max_epochs is unknown; set "
                    "trainer.max_epochs or an explicit schedule.switch_epoch"
                )
            switch_epoch = max_epochs // 2
        if switch_epoch < 0:
            raise ValueError(f"schedule.switch_epoch must be >= 0, got {switch_epoch}")
        if ramp_epochs < 0:
            raise ValueError(f"schedule.ramp_epochs must be >= 0, got {ramp_epochs}")
        if max_epochs is not None and self.phase1 != self.phase2 and switch_epoch >= max_epochs:
            raise ValueError(
                f"schedule.switch_epoch={switch_epoch} is at or after the last epoch "
                f"(max_epochs={max_epochs}, epochs 0..{max_epochs - 1}), so phase 2 would never run; "
                f"allowed: 0..{max_epochs - 1}"
            )
        full = switch_epoch + ramp_epochs  # the first epoch with phase 2's weights alone
        if max_epochs is not None and self.phase1 != self.phase2 and ramp_epochs and full > max_epochs - 1:
            raise ValueError(
                f"schedule.switch_epoch={switch_epoch} with schedule.ramp_epochs={ramp_epochs} reaches phase "
                f"2's weights only at epoch {full}, after the last epoch {max_epochs - 1} "
                f"(max_epochs={max_epochs}); allowed: schedule.ramp_epochs <= "
                f"{max(max_epochs - 1 - switch_epoch, 0)}, an earlier schedule.switch_epoch or more epochs"
            )
        self.switch_epoch = int(switch_epoch)
        self.ramp_epochs = int(ramp_epochs)
        self.max_epochs = max_epochs

    def phase2_fraction(self, epoch: float) -> float:
        """Share of phase-2 weights at ``epoch`` (0 in phase 1, 1 once the ramp is over)."""
        if epoch < self.switch_epoch:
            return 0.0
        return min(1.0, (epoch - self.switch_epoch + 1) / (self.ramp_epochs + 1))

    def weights(self, epoch: float) -> tuple[float, ...]:
        """Per-exit loss weights at ``epoch`` (0-based)."""
        a = self.phase2_fraction(epoch)
        return tuple((1 - a) * w1 + a * w2 for w1, w2 in zip(self.phase1, self.phase2, strict=True))

    def __repr__(self) -> str:
        return (
            f"TwoPhaseSchedule(phase1={list(self.phase1)}, phase2={list(self.phase2)}, "
            f"switch_epoch={self.switch_epoch}, ramp_epochs={self.ramp_epochs})"
        )
