"""Per-exit temperature scaling, ECE, reliability bins, and what calibration does to the exit protocol."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.builders import TINY_CONFIG, make_tiny_vit
from torchmetrics.classification import MulticlassCalibrationError

from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.evaluation.calibration import (
    TEMPERATURE_RANGE,
    ExitLogitsCollector,
    apply_temperatures,
    calibrate_exits,
    exit_calibration_errors,
    exit_nll,
    fit_exit_temperatures,
    fit_temperature,
    reliability_bins,
)
from dmpo_lightning.evaluation.protocol import assign_exits, budgeted_curve, operating_points
from dmpo_lightning.evaluation.thresholds import load_temperatures
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.exit_rules import exit_scores

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG


def _synthetic(n, c, t0, seed=0):
    """Logits ``z * t0`` with labels drawn from ``softmax(z)``: the true temperature is ``t0``."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return z * t0, y


# ------------------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("t0", [0.4, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(t0):
    logits, y = _synthetic(20000, 10, t0)
    assert fit_temperature(logits, y) == pytest.approx(t0, rel=0.05)


def test_fit_exit_temperatures_fits_each_exit_on_its_own():
    a, y = _synthetic(8000, 5, 0.5, seed=1)
    b = a / 0.5 * 3.0  # same z, true temperature 3
    temps = fit_exit_temperatures(torch.stack([a, b], dim=1), y)
    assert temps[0].item() == pytest.approx(0.5, rel=0.07)
    assert temps[1].item() == pytest.approx(3.0, rel=0.07)
    assert temps[1].item() / temps[0].item() == pytest.approx(6.0, rel=1e-4)  # NLL(z/T) depends on z/T only


def test_fitted_temperature_minimises_the_nll():
    logits, y = _synthetic(3000, 7, 1.8, seed=2)
    t = fit_temperature(logits, y)
    grid = torch.exp(torch.linspace(-2, 2, 801, dtype=torch.float64))
    nll_grid = torch.stack([F.cross_entropy(logits / g, y) for g in grid])
    nll_fit = F.cross_entropy(logits / t, y)
    assert nll_fit <= nll_grid.min() + 1e-7
    before, after = exit_nll(logits[:, None], y), exit_nll(logits[:, None], y, torch.tensor([t]))
    assert after[0] < before[0]


def test_fit_works_under_inference_mode():
    # Lightning runs on_test_epoch_end under torch.inference_mode; the fit must still get gradients
    logits, y = _synthetic(2000, 5, 2.0, seed=6)
    with torch.inference_mode():
        inside = fit_temperature(logits.clone(), y.clone())
    assert inside == pytest.approx(fit_temperature(logits, y), rel=1e-9)


def test_separable_calibration_data_keep_t_1_with_a_warning():
    z, y = _synthetic(200, 4, 1.0, seed=7)
    z[torch.arange(200), y] = z.max(dim=1).values + 1.0  # every sample right: NLL -> 0 as T -> 0
    with pytest.warns(UserWarning, match="no finite minimiser"):
        assert fit_temperature(z, y) == 1.0
    z[0, y[0]] -= 3.0  # one wrong sample: a finite minimiser exists again, below 1 (over-separable data)
    assert TEMPERATURE_RANGE[0] < fit_temperature(z, y) < 1.0


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="empty split"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels in"):
        fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="> 0"):
        apply_temperatures(torch.zeros(2, 2, 3), [1.0, 0.0])


# ---------------------------------------------------------------------------------------------------- ECE
def test_ece_equals_torchmetrics_and_the_reliability_bins():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 3, 5, generator=g) * 2
    y = torch.randint(0, 5, (64,), generator=g)
    ece = exit_calibration_errors(logits, y)
    for k in range(3):
        metric = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")
        metric.update(logits[:, k].softmax(-1), y)
        assert ece[k].item() == pytest.approx(metric.compute().item(), abs=1e-6)
        bins = reliability_bins(logits[:, k], y)
        count = torch.tensor(bins["count"])
        gap = (torch.tensor(bins["accuracy"]) - torch.tensor(bins["confidence"])).abs()
        assert count.sum().item() == 64
        assert (gap * count).sum().item() / 64 == pytest.approx(ece[k].item(), abs=1e-6)


def test_ece_applies_the_softmax_even_when_logits_lie_in_0_1():
    # torchmetrics skips its softmax for inputs in [0, 1]; such logits must still become probabilities
    logits = torch.tensor([[[0.9, 0.1, 0.0]], [[0.2, 0.8, 0.5]]])
    y = torch.tensor([0, 2])
    probs = logits[:, 0].softmax(-1)
    expected = MulticlassCalibrationError(num_classes=3, n_bins=15)(probs, y)
    assert exit_calibration_errors(logits, y)[0].item() == pytest.approx(expected.item(), abs=1e-6)
    raw = MulticlassCalibrationError(num_classes=3, n_bins=15)(logits[:, 0], y)
    assert abs(raw.item() - expected.item()) > 1e-3  # the trap this guards against is real


def test_calibrate_exits_lowers_the_ece_of_overconfident_exits():
    z, y = _synthetic(4000, 10, 1.0, seed=4)
    logits = torch.stack([z * 3.0, z * 0.5], dim=1).float()  # exit 1 over-, exit 2 under-confident
    cal, test = slice(0, 2000), slice(2000, 4000)
    result, _, (test_s, test_p) = calibrate_exits(
        logits[cal], y[cal], logits[test], y[test], lambda zs: exit_scores(torch.stack(zs, 1), "confidence")
    )
    assert result.temperatures[0] > 1.5 and result.temperatures[1] < 0.8
    assert bool((result.ece_after < result.ece_before).all())
    assert bool((result.nll_after <= result.nll_before).all())
    assert torch.equal(test_p, logits[test].argmax(-1))  # temperatures never change a prediction
    expected, _ = exit_scores(apply_temperatures(logits[test], result.temperatures), "confidence")
    assert torch.equal(test_s, expected)
    report = result.to_report()
    assert report["ece_before"] == pytest.approx(result.ece_before.tolist())
    assert len(report["reliability"]["after"]) == 2


# ------------------------------------------------------------------------------- effect on the protocol
def _curves(logits_cal, y_cal, logits_test, y_test, rule):
    cal_s, cal_p = exit_scores(logits_cal, rule)
    test_s, test_p = exit_scores(logits_test, rule)
    cal_c, test_c = cal_p == y_cal[:, None], test_p == y_test[:, None]
    costs, full = [1.0, 2.0, 3.0], 3.0
    curve = budgeted_curve(cal_s.double(), cal_c, test_s.double(), test_c, costs, full)
    points = operating_points(
        cal_s.double(), cal_c, test_s.double(), test_c, costs, full, budgets=[0.5, 0.75, 1.0]
    )
    exits = assign_exits(test_s.double(), curve.thresholds)
    return curve, points, exits


def _split(c, seed=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(600, 3, c, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])[:, None]
    y = torch.randint(0, c, (600,), generator=g)
    return logits[:300], y[:300], logits[300:], y[300:]


TEMPS = torch.tensor([2.7, 0.6, 1.9], dtype=torch.float64)


@pytest.mark.parametrize(
    "temps", [TEMPS, torch.full((3,), 2.3, dtype=torch.float64)], ids=["per-exit", "global"]
)
def test_binary_confidence_protocol_is_unchanged_by_temperatures(temps):
    """C = 2: max softmax of z / T is an increasing function of max softmax of z, for every T > 0."""
    zc, yc, zt, yt = _split(2)
    raw = _curves(zc, yc, zt, yt, "confidence")
    cal = _curves(apply_temperatures(zc, temps), yc, apply_temperatures(zt, temps), yt, "confidence")
    finite = torch.isfinite(raw[0].thresholds[:, :-1])
    assert not torch.allclose(raw[0].thresholds[:, :-1][finite], cal[0].thresholds[:, :-1][finite])
    assert torch.equal(raw[2], cal[2])  # every test sample leaves at the same exit for every q
    for name in ("test_accuracy", "test_cost", "test_histogram", "cal_accuracy", "cal_histogram"):
        assert torch.equal(getattr(raw[0], name), getattr(cal[0], name)), name
    for a, b in zip(raw[1], cal[1], strict=True):
        assert (a.q, a.test_accuracy, a.test_cost) == (b.q, b.test_accuracy, b.test_cost)
        assert a.thresholds[0] != b.thresholds[0] or not torch.isfinite(a.thresholds[0])


def test_any_increasing_per_exit_map_of_the_scores_leaves_the_protocol_unchanged():
    """The general statement: thresholds are per exit and set by rank, so a strictly increasing map of one
    exit's scores moves its thresholds and nothing else (here: a logit-like map, different per exit)."""
    zc, yc, zt, yt = _split(10)
    cal_s, cal_p = exit_scores(zc, "confidence")
    test_s, test_p = exit_scores(zt, "confidence")
    cal_c, test_c = cal_p == yc[:, None], test_p == yt[:, None]

    def warp(s):
        s = s.double()
        return torch.stack([torch.log(s[:, 0]), s[:, 1] ** 3, 5 * s[:, 2] - 1], dim=1)

    a = budgeted_curve(cal_s.double(), cal_c, test_s.double(), test_c, [1.0, 2.0, 3.0], 3.0)
    b = budgeted_curve(warp(cal_s), cal_c, warp(test_s), test_c, [1.0, 2.0, 3.0], 3.0)
    assert torch.equal(a.test_histogram, b.test_histogram) and torch.equal(a.test_accuracy, b.test_accuracy)
    assert not torch.equal(a.thresholds, b.thresholds)


@pytest.mark.parametrize("rule", ["confidence", "entropy"])
@pytest.mark.parametrize(
    "temps", [TEMPS, torch.full((3,), 2.3, dtype=torch.float64)], ids=["per-exit", "global"]
)
def test_with_more_than_two_classes_temperatures_can_change_the_exits(rule, temps):
    """C = 10: max softmax and entropy at T != 1 are not functions of their value at T = 1, so the ranking
    of samples at an exit changes and with it which samples leave there."""
    zc, yc, zt, yt = _split(10)
    raw = _curves(zc, yc, zt, yt, rule)
    cal = _curves(apply_temperatures(zc, temps), yc, apply_temperatures(zt, temps), yt, rule)
    assert not torch.equal(raw[2], cal[2])
    # two samples whose max softmax order flips with the temperature: the mechanism, made explicit
    a, b = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, -20.0]])
    p1 = exit_scores(torch.cat([a, b])[:, None], "confidence")[0][:, 0]
    p3 = exit_scores(torch.cat([a, b])[:, None] / 3.0, "confidence")[0][:, 0]
    assert (p1[0] > p1[1]) and (p3[0] < p3[1])


def test_patience_is_unchanged_by_any_temperature():
    zc, _, _, _ = _split(10)
    raw_s, raw_p = exit_scores(zc, "patience")
    for temps in (TEMPS, torch.full((3,), 0.05, dtype=torch.float64)):
        s, p = exit_scores(apply_temperatures(zc, temps), "patience")
        assert torch.equal(s, raw_s) and torch.equal(p, raw_p)


# ------------------------------------------------------------------------- deploy path and collectors
def test_early_exit_forward_with_temperatures_matches_the_simulated_protocol():
    torch.manual_seed(0)
    model = MultiExitViT(make_tiny_vit(), 5, {"blocks": [1, 2, 3, 4], "early_head": "linear"}).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(32, 3, 32, 32)
    temps = torch.tensor([2.0, 0.7, 1.3, 1.0])
    with torch.no_grad():
        logits = torch.stack(model(x), dim=1)
    scores, _ = exit_scores(apply_temperatures(logits, temps), "confidence")
    thresholds = [*scores.median(dim=0).values[:3].tolist(), float("-inf")]
    expected = assign_exits(scores, torch.tensor(thresholds))
    out = model.forward_early_exit(x, thresholds, "confidence", temperatures=temps)
    assert torch.equal(out.exit_index, expected)
    assert len(set(expected.tolist())) > 1
    raw = model.forward_early_exit(x, thresholds, "confidence")
    assert not torch.equal(raw.exit_index, expected)  # ignoring the temperatures would decide differently


def test_load_temperatures(tmp_path):
    path = tmp_path / "thresholds.json"
    header = {"format": THRESHOLDS_FORMAT, "format_version": THRESHOLDS_FORMAT_VERSION}
    path.write_text(json.dumps(header))
    assert load_temperatures(str(path), 3) == [1.0, 1.0, 1.0]  # made without calibration
    path.write_text(json.dumps({**header, "temperatures": [1.5, 0.5, 2.0]}))
    assert load_temperatures(str(path), 3) == [1.5, 0.5, 2.0]
    path.write_text(json.dumps({**header, "temperatures": [1.5, 0.5]}))
    with pytest.raises(ValueError, match="need 3 finite values > 0"):
        load_temperatures(str(path), 3)


def test_logits_collector_dedupes_like_the_outputs_collector():
    c = ExitLogitsCollector()
    z = torch.randn(3, 2, 4)
    c.update(torch.tensor([2, 0, 1]), z, torch.tensor([1, 2, 3]))
    c.update(torch.tensor([2]), z[:1], torch.tensor([1]))  # DistributedSampler padding
    out = c.compute()
    assert out["index"].tolist() == [0, 1, 2]
    assert torch.equal(out["logits"], z[[1, 2, 0]])


def test_unknown_calibration_is_refused():
    from dmpo_lightning.evaluation.evaluator import EvaluationOptions

    with pytest.raises(ValueError, match="unknown calibration 'platt'"):
        EvaluationOptions(calibration="platt")


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_fit_then_test_reports_temperatures_ece_and_reliability(tmp_path, monkeypatch):
    from dmpo_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "-c",
            TINY,
            "--test_after_fit",
            "true",
            "--evaluation.calibration",
            "temperature",
        ]
    )
    report_dir = Path(cli.trainer.log_dir) / "dmpo_test"
    report = json.loads((report_dir / "report.json").read_text())
    calib = report["calibration"]
    assert calib["method"] == "temperature"
    assert len(calib["temperatures"]) == len(calib["ece_before"]) == len(calib["ece_after"]) == 4
    assert all(t > 0 for t in calib["temperatures"])
    assert all(0 <= e <= 1 for e in calib["ece_before"] + calib["ece_after"])
    assert (report_dir / "reliability.png").stat().st_size > 1000
    thresholds = json.loads((report_dir / "thresholds.json").read_text())
    assert thresholds["temperatures"] == calib["temperatures"]

    # dmpo predict applies the stored temperatures: the true early exit matches the protocol's test split
    ckpt = next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    preds = tmp_path / "preds.csv"
    predict = main(
        [
            "predict", "-c", TINY, f"--ckpt_path={ckpt}", "--evaluation.predict_budget=0.5",
            f"--evaluation.thresholds_file={report_dir / 'thresholds.json'}",
            f"--evaluation.predictions_file={preds}",
        ]
    )  # fmt: skip
    assert predict.model.exit_temperatures.tolist() == pytest.approx(calib["temperatures"], rel=1e-6)
    rows = list(csv.DictReader(preds.read_text().splitlines()))
    # the CSV numbers exits from 1, as the report does
    exits = torch.bincount(torch.tensor([int(r["exit"]) - 1 for r in rows]), minlength=4).tolist()
    point = next(b for b in report["budgets"] if b["budget"] == 0.5)
    assert exits == point["test_histogram"]
    correct = sum(int(r["label"]) == int(r["class_index"]) for r in rows) / len(rows)
    assert correct == pytest.approx(point["test_accuracy"], abs=1e-9)

    # dmpo test --ckpt_path keeps the user's calibration (an evaluation-only option)
    none_dir = tmp_path / "none"
    main(
        [
            "test", "-c", TINY, f"--ckpt_path={ckpt}", "--evaluation.calibration=none",
            f"--evaluation.report_dir={none_dir}",
        ]
    )  # fmt: skip
    none = json.loads((none_dir / "report.json").read_text())
    assert none["calibration"] == {"method": "none"}
    assert none["config"]["evaluation"]["calibration"] == "none"  # the report's config holds the groups
    assert not (none_dir / "reliability.png").exists()
    assert none["exits"] == report["exits"]  # anytime accuracy does not depend on the temperatures
