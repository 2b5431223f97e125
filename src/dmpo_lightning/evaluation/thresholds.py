"""``thresholds.json``: the early-exit thresholds ``dmpo test`` fits, written once and read back everywhere.

``dmpo test`` writes the file (:func:`thresholds_file_content`, next to its report); ``dmpo predict``
(:func:`load_thresholds`, :func:`load_temperatures`) and ``dmpo export`` (:func:`read_thresholds`) read it.
Every reader goes through :func:`read_thresholds`, which refuses anything that is not a thresholds file of
the format this package writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.errors import ConfigError, ConfigFileNotFoundError
from dmpo_lightning.evaluation.protocol import BudgetedCurve, OperatingPoint, protocol_budget_unit
from dmpo_lightning.files import check_format, decode_float, read_json
from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY

__all__ = [
    "THRESHOLDS_OPTION",
    "load_temperatures",
    "load_thresholds",
    "read_thresholds",
    "thresholds_file_content",
    "thresholds_rule",
]

THRESHOLDS_OPTION = "evaluation.thresholds_file"
"""The option that names the thresholds file ``dmpo predict`` reads."""


def thresholds_file_content(
    curve: BudgetedCurve,
    points: Sequence[OperatingPoint],
    *,
    rule: str,
    fingerprint: Mapping[str, Any],
    checkpoint_hash: str,
    weights_hash: str | None,
    temperatures: Sequence[float] | None,
) -> dict[str, Any]:
    """What ``thresholds.json`` holds (write it with :func:`~dmpo_lightning.files.write_json`).

    Args:
        curve: The budgeted-batch curve (its q grid and thresholds per q are kept).
        points: The operating points of the requested budgets.
        rule: The registered exit rule the thresholds were fitted for (they mean nothing under another).
        fingerprint: The model's fingerprint, which a reader's model must match.
        checkpoint_hash: The evaluated checkpoint (``file:...``) or weights (``weights:...``).
        weights_hash: The evaluated weights in memory (``weights:...``), if known.
        temperatures: Per-exit temperatures the scores were computed with, or ``None``.
    """
    return {
        "format": THRESHOLDS_FORMAT,
        "format_version": THRESHOLDS_FORMAT_VERSION,
        "rule": rule,
        "fingerprint": dict(fingerprint),
        "checkpoint_hash": checkpoint_hash,
        **({"weights_hash": weights_hash} if weights_hash is not None else {}),
        "budgets": [
            {
                "budget": p.budget,
                "unit": p.budget_unit,
                "thresholds": p.thresholds,
                "cal_cost_fraction": p.cal_cost / curve.full_cost,
                "test_accuracy": p.test_accuracy,
            }
            for p in points
        ],
        "temperatures": temperatures,
        "qs": curve.qs,
        "thresholds_per_q": curve.thresholds,
    }


def read_thresholds(path: str) -> dict[str, Any]:
    """The content of a ``thresholds.json`` written by ``dmpo test``, checked to be one.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not valid JSON, not a dmpo thresholds file, or of another format version (an
            older file fingerprinted the model under other names): one sentence that says to re-run
            ``dmpo test``.
    """
    data = read_json(path, "thresholds file", filename="thresholds.json", writer="`dmpo test`")
    return check_format(
        data,
        path,
        name=THRESHOLDS_FORMAT,
        version=THRESHOLDS_FORMAT_VERSION,
        what="dmpo thresholds file",
        remedy="re-run `dmpo test` on the checkpoint to write a new thresholds.json",
        older={"dmpo-thresholds-v1": 1},
    )


def thresholds_rule(path: str) -> str:
    """The registered exit rule a ``thresholds.json`` was fitted for (its thresholds mean nothing elsewhere).

    Raises:
        ConfigError: If the file names no rule, or one that is not registered in this process.
    """
    try:
        rule = read_thresholds(path).get("rule")
    except FileNotFoundError as err:
        raise ConfigFileNotFoundError(str(err), option=THRESHOLDS_OPTION) from None
    except ValueError as err:
        raise ConfigError(str(err), option=THRESHOLDS_OPTION) from None
    if not isinstance(rule, str) or not rule:
        raise ConfigError(
            f"thresholds file {path} names no exit rule; run `dmpo test` again to write a new one",
            option=THRESHOLDS_OPTION,
        )
    if rule not in EXIT_RULE_REGISTRY:
        raise ConfigError(
            f"thresholds file {path} was fitted for the exit rule {rule!r}, which is not registered here "
            f"(registered: {', '.join(EXIT_RULE_REGISTRY)}); import the module that registers it first",
            option=THRESHOLDS_OPTION,
        )
    return rule


def load_thresholds(
    path: str,
    budget: float | None,
    fingerprint: Mapping[str, Any],
    unit: str = "fraction",
    *,
    num_exits: int | None = None,
    model_hashes: Sequence[str] = (),
    allow_other_checkpoint: bool = False,
) -> list[float]:
    """Thresholds for ``budget`` from a ``thresholds.json`` of ``dmpo test`` (see :func:`_read_thresholds`).

    Raises:
        ConfigFileNotFoundError: If the file is missing.
        ConfigError: If the file cannot be used (a :class:`ValueError`; ``dmpo`` prints it as one line).
    """
    try:
        return _read_thresholds(
            path,
            budget,
            fingerprint,
            unit,
            num_exits=num_exits,
            model_hashes=model_hashes,
            allow_other_checkpoint=allow_other_checkpoint,
        )
    except ConfigError:
        raise
    except FileNotFoundError as err:
        raise ConfigFileNotFoundError(str(err), option=THRESHOLDS_OPTION) from None
    except ValueError as err:
        raise ConfigError(str(err), option=THRESHOLDS_OPTION) from None


def _read_thresholds(
    path: str,
    budget: float | None,
    fingerprint: Mapping[str, Any],
    unit: str = "fraction",
    *,
    num_exits: int | None = None,
    model_hashes: Sequence[str] = (),
    allow_other_checkpoint: bool = False,
) -> list[float]:
    """Thresholds for ``budget`` from a ``thresholds.json`` written by ``dmpo test``.

    Args:
        path: The thresholds file.
        budget: The budget whose thresholds to return.
        fingerprint: What the file's ``fingerprint`` must match (architecture, exits, heads, exit rule).
        unit: ``fraction`` or ``gflops`` (the unit of ``budget``).
        num_exits: Exits of the model; the thresholds list must have exactly one entry per exit.
        model_hashes: Every hash that identifies the model's current weights (``weights:...`` and, when it was
            loaded from a checkpoint file, ``file:...``); the file's ``weights_hash`` or ``checkpoint_hash``
            must be one of them. Empty: not checked.
        allow_other_checkpoint: Accept thresholds fitted on other weights of the same architecture, with a
            warning naming both hashes, instead of refusing them.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a thresholds file, was made for another model (different backbone, exits,
            classes, heads or exit rule) or other weights, holds no entry for ``budget`` (the available ones
            are listed), or the entry is not one number (or ``"inf"``) per exit.
    """
    data = read_thresholds(path)
    theirs = data.get("fingerprint")
    if not isinstance(theirs, dict):
        raise ValueError(
            f"thresholds file {path} holds no fingerprint of the model it was calibrated for, so it is "
            "corrupt; re-run `dmpo test` on the checkpoint to write a new thresholds.json"
        )
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"thresholds file {path} was calibrated for another model ({details})")
    if model_hashes:
        _check_weights(path, data, list(model_hashes), allow_other_checkpoint)
    entries = data.get("budgets", [])
    if budget is None:
        raise ValueError(
            f"choose one of the budgets in {path} with evaluation.predict_budget: "
            f"{[e['budget'] for e in entries]}"
        )
    want = protocol_budget_unit(unit)
    for e in entries:
        if abs(float(e["budget"]) - float(budget)) < 1e-9 and e.get("unit", want) == want:
            return _check_threshold_list(path, budget, e.get("thresholds"), num_exits)
    raise ValueError(
        f"budget {budget} ({unit}) is not in {path}; available: {[e['budget'] for e in entries]} "
        "(run `dmpo test` with it in evaluation.budgets)"
    )


def load_temperatures(path: str, num_exits: int) -> list[float]:
    """Per-exit temperatures stored in a ``thresholds.json`` (all 1.0 when it was made without calibration).

    The thresholds in the file were chosen on scores of ``logits / T_k``, so they are only valid with these
    temperatures; ``dmpo predict`` applies them whatever the model's own ``calibration`` option says.

    Raises:
        ValueError: If the file holds temperatures for another number of exits or non-positive ones.
    """
    temps = read_thresholds(path).get("temperatures")
    if temps is None:
        return [1.0] * num_exits
    values = [float(t) for t in temps]
    if len(values) != num_exits or not all(t > 0 and t != float("inf") for t in values):
        raise ValueError(
            f"thresholds file {path} holds temperatures {temps}; need {num_exits} finite values > 0"
        )
    return values


def _check_weights(path: str, data: Mapping[str, Any], mine: list[str], allow: bool) -> None:
    """Refuse (or, if ``allow``, warn about) thresholds fitted on weights other than the model's."""
    stored = [h for h in (data.get("weights_hash"), data.get("checkpoint_hash")) if isinstance(h, str)]
    if any(h in mine for h in stored):
        return
    file_says = " / ".join(stored) if stored else "no checkpoint_hash"
    what = (
        f"thresholds file {path} was calibrated on other weights ({file_says}) than this model holds "
        f"({' / '.join(mine)})"
    )
    if allow:
        rank_zero_warn(
            f"{what}; using them anyway because "
            "evaluation.allow_other_checkpoint_thresholds=true: the budgets and accuracies "
            "in that file do not hold for these weights"
        )
        return
    raise ValueError(
        f"{what}: early-exit thresholds only fit the weights they were fitted on. Run `dmpo test` with this "
        "checkpoint and use its thresholds.json, or set "
        "evaluation.allow_other_checkpoint_thresholds=true to use them anyway"
    )


def _check_threshold_list(path: str, budget: float, raw: Any, num_exits: int | None) -> list[float]:
    """One number (or ``"inf"``/``"-inf"``) per exit, no NaN: the thresholds of one budget entry."""
    where = f"thresholds file {path}, budget {budget}"
    allowed = "allowed: one number per exit, 'inf' to disable an exit; NaN/null is not allowed"
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'thresholds' must be a list, got {type(raw).__name__}; {allowed}")
    if num_exits is not None and len(raw) != num_exits:
        raise ValueError(
            f"{where}: holds {len(raw)} thresholds but the model has {num_exits} exits; {allowed} "
            "(re-run `dmpo test` for this model)"
        )
    values = []
    for k, t in enumerate(raw):
        ok = (isinstance(t, (int, float)) and not isinstance(t, bool)) or t in ("inf", "-inf")
        value = decode_float(t) if ok else float("nan")
        if not ok or value != value:
            raise ValueError(f"{where}: threshold {t!r} of exit {k} is not a number; {allowed}")
        values.append(value)
    return values
