"""schedules.py: the two-phase loss-weight schedule (presets, switch, ramp, bad options)."""

import pytest

from dmpo_lightning.schedules import ScheduleOptions, TwoPhaseSchedule, preset_weights


def test_presets_for_four_exits():
    assert preset_weights("depth_increasing", 4) == (0.25, 0.5, 0.75, 1.0)
    assert preset_weights("uniform", 4) == (1.0, 1.0, 1.0, 1.0)
    assert preset_weights("early_emphasis", 4) == (1.0, 0.75, 0.5, 0.25)


def test_hard_switch_default_is_half_of_max_epochs():
    s = TwoPhaseSchedule(4, max_epochs=10)
    assert s.switch_epoch == 5
    assert [s.weights(e) for e in (0, 4)] == [(0.25, 0.5, 0.75, 1.0)] * 2
    assert [s.weights(e) for e in (5, 9)] == [(1.0, 1.0, 1.0, 1.0)] * 2


def test_linear_ramp_moves_weights_between_phases():
    s = TwoPhaseSchedule(
        2, ScheduleOptions([0.0, 1.0], [1.0, 1.0], switch_epoch=2, ramp_epochs=3), max_epochs=10
    )
    firsts = [s.weights(e)[0] for e in range(8)]
    assert firsts == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_explicit_lists_and_same_phases_need_no_switch():
    s = TwoPhaseSchedule(3, {"weight_phase1": [1, 2, 3], "weight_phase2": [1, 2, 3], "switch_epoch": 100}, 5)
    assert s.weights(4) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("options", "max_epochs", "match"),
    [
        (dict(weight_phase1=[1.0, 1.0]), 10, "weight_phase1 has 2 entries but the model has 4 exits"),
        (dict(weight_phase2=[1.0, -1.0, 1.0, 1.0]), 10, "weight_phase2.*must be finite and >= 0"),
        (dict(weight_phase1=[0, 0, 0, 0]), 10, "all zero"),
        (
            dict(weight_phase1="deep_first"),
            10,
            "not a preset; allowed: depth_increasing, uniform, early_emphasis",
        ),
        (dict(switch_epoch=10), 10, r"phase 2 would never run; allowed: 0\.\.9"),
        (dict(switch_epoch=-1), 10, "switch_epoch must be >= 0"),
        (dict(ramp_epochs=-2), 10, "ramp_epochs must be >= 0"),
        (dict(), None, "max_epochs is unknown"),
        (dict(phase1=[1.0] * 4), 10, "schedule has no option 'phase1'; its options are weight_phase1, "),
    ],
)
def test_invalid_schedules_fail_with_allowed_values(options, max_epochs, match):
    with pytest.raises(ValueError, match=match):
        TwoPhaseSchedule(4, options, max_epochs=max_epochs)
