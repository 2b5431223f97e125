"""Smoke test of benchmarks/pretrain_tune.py --quick (a tiny model on a few hundred Fashion-MNIST images),
both proxies, and unit tests of its summary numbers (matched test cost, common-range mean, paired table);
the fair baselines are trained as runs of their own."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dmpo_lightning.data.fashion_mnist import default_root

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pretrain_tune.py"

needs_fashion_mnist = pytest.mark.skipif(
    default_root() is None, reason="needs the Debian package dataset-fashion-mnist (full Fashion-MNIST)"
)


def _load_benchmark():
    """Import benchmarks/pretrain_tune.py (not a package) under its own module name."""
    if "pretrain_tune" in sys.modules:
        return sys.modules["pretrain_tune"]
    spec = importlib.util.spec_from_file_location("pretrain_tune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_tune"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pretrain_tune"]
        raise
    return module


SMALL = ["--quick", "--train-size", "100", "--calibration-size", "60", "--test-size", "100"]


def _rows(section: str) -> dict[str, list[str]]:
    """``{first cell: cells}`` of the first markdown table in ``section``."""
    all_lines = section.splitlines()
    first = next(i for i, line in enumerate(all_lines) if line.startswith("| "))
    lines = []
    for line in all_lines[first:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.setdefault(cells[0], cells)
    return rows


@needs_fashion_mnist
@pytest.mark.slow
def test_quick_benchmark_runs_both_proxies_writes_tables_and_reuses_the_cache(tmp_path, capsys):
    bench = _load_benchmark()
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [*SMALL, "--cache-dir", str(cache), "--seeds", "2"]
    variants = "static_peft,static_peft_moment,dmpo,exit_entropy"
    payload = bench.main([*args, "--variants", variants, "--output", str(out)])

    # Both proxies by default, each with its own source model (5 garment families for coarse-to-fine).
    assert payload["proxies"] == ["same-labels", "coarse-to-fine"]
    coarse, same = payload["pretrain"]["coarse-to-fine"], payload["pretrain"]["same-labels"]
    assert coarse["num_classes"] == 5 and coarse["label_map"] == list(bench.COARSE_LABELS)
    assert same["num_classes"] == 10 and same["label_map"] is None
    assert payload["checkpoint"]["coarse-to-fine"] != payload["checkpoint"]["same-labels"]
    assert {r["proxy"] for r in payload["results"]} == {"same-labels", "coarse-to-fine"}

    # table.md: per proxy the main table (matched test costs, first/last exit, common-range mean), the
    # paired dmpo - baseline table and the per-exit table.
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] in printed
    sections = table.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["same-labels", "coarse-to-fine"]
    for section in sections:
        header = next(line for line in section.splitlines() if line.startswith("| variant"))
        for column in ("30%", "40%", "50%", "75%", "100%", "first exit (cost)", "last exit (cost)", "mean "):
            assert column in header
        assert "AUC" not in header
        rows = _rows(section)
        assert set(rows) == {
            "static_peft",
            "static_peft_moment",
            "dmpo",
            "exit_entropy (= dmpo run)",
        }
        assert rows["static_peft"][1:5] == ["—"] * 4 and rows["static_peft"][5] != "—"
        assert rows["static_peft"][8] == "—"  # a single exit has no range of costs to average over
        assert "±" in rows["dmpo"][6] and rows["static_peft"][11] == "1.00x"
        # costs share one reference (static_peft's full model): the moment head at the last exit makes
        # static_peft_moment's only operating point dearer than 100 %, so it has no 100% value
        last_cost = float(rows["static_peft_moment"][7].split("(")[1].rstrip("%)"))
        assert last_cost > 100.0 and rows["static_peft_moment"][5] == "—"
        paired = section[section.index("Paired differences") :]
        paired_rows = _rows(paired)
        assert {"static_peft", "static_peft_moment"} <= set(paired_rows)
        assert paired_rows["static_peft"][-1] == "0"  # seed ids both ran
        assert "Per-exit test top-1" in section

    # Seeds, shared runs and the dmpo test protocol's reports.
    results = payload["results"]
    for proxy in payload["proxies"]:
        seeds = sorted(r["seed"] for r in results if r["variant"] == "dmpo" and r["proxy"] == proxy)
        assert seeds == [0, 1]
    entropy = next(r for r in results if r["variant"] == "exit_entropy")
    assert entropy["trained_as"] == "dmpo" and entropy["exit_rule"] == "entropy"
    for r in results:
        assert (Path(r["report_dir"]) / "report.json").is_file()
        assert f"/runs/{r['proxy']}/" in r["report_dir"]
    assert payload["environment"]["quick"] is True
    assert json.loads((out / "results.json").read_text())["rows"]
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["kind"] for row in rows} == {"anytime", "budget", "dynamic"}
    assert {row["proxy"] for row in rows} == {"same-labels", "coarse-to-fine"}
    for proxy in payload["proxies"]:
        assert (out / f"accuracy_vs_cost_{proxy}.png").stat().st_size > 0

    # The pre-trained source models are cached per proxy and reused by the next run.
    assert coarse["reused"] is False and same["reused"] is False
    again = bench.main(
        [*args, "--variants", "dmpo", "--seed-start", "2", "--seeds", "1", "--output", str(tmp_path / "o2")]
    )
    assert again["pretrain"]["coarse-to-fine"]["reused"] is True
    assert again["checkpoint"] == payload["checkpoint"]
    assert sorted(r["seed"] for r in again["results"]) == [2, 2]

    # --summarise puts both folders' runs in one table (3 dmpo seeds), in a new folder.
    both = [str(out), str(tmp_path / "o2")]
    merged = bench.main([*SMALL, "--summarise", *both, "--output", str(tmp_path / "m")])
    dmpo_rows = [r for r in merged["rows"]["coarse-to-fine"] if r["variant"] == "dmpo"]
    assert dmpo_rows[0]["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="more than one folder"):
        bench.main([*SMALL, "--summarise", str(out), str(out), "--output", str(tmp_path / "m2")])
    assert not (tmp_path / "m2").exists()

    # An existing output folder is never overwritten.
    with pytest.raises(SystemExit, match="never overwritten"):
        bench.main([*args, "--output", str(out)])


@needs_fashion_mnist
def test_bad_proxy_is_refused_before_anything_is_written(tmp_path):
    bench = _load_benchmark()
    with pytest.raises(SystemExit, match="--proxy 'coarse': expected a comma list of same-labels"):
        bench.main([*SMALL, "--proxy", "coarse", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _run(variant: str, seed: int, costs: list[float], accs: list[float], full: float = 1.0) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "trained_as": variant,
        "exit_rule": "confidence",
        "exits": [
            {"cost_fraction": costs[0], "top1": accs[0]},
            {"cost_fraction": costs[-1], "top1": accs[-1]},
        ],
        "curve": {"q": list(range(len(costs))), "test_cost_fraction": costs, "test_accuracy": accs},
        "full_cost": full,
        "trainable_parameters": 1,
        "epoch_seconds": [1.0],
    }


@needs_fashion_mnist
def test_matched_cost_reads_the_test_curve_and_the_mean_covers_only_the_common_range():
    bench = _load_benchmark()
    early = _run("dmpo", 0, [0.3, 0.5, 1.0], [0.80, 0.84, 0.86])
    cheap = _run("sdn_linear", 0, [0.26, 1.0], [0.70, 0.74])
    assert bench.accuracy_at_cost(early, 0.25) is None  # below the cheapest point: no value, not 0
    assert bench.accuracy_at_cost(early, 0.4) == pytest.approx(0.82)  # linear interpolation
    assert bench.accuracy_at_cost(early, 1.2) == pytest.approx(0.86)  # a larger budget may stay unused
    groups = {"dmpo": [early], "sdn_linear": [cheap]}
    assert bench.common_range(groups) == (0.3, 1.0)  # starts where every curve has begun
    rows = {r["variant"]: r for r in bench.summarise([early, cheap], ["sdn_linear", "dmpo"])}
    # an AUC would count 0 below a model's first exit; the common-range mean never drops below the curve
    assert rows["dmpo"]["mean_common"][0] > 0.80 and rows["sdn_linear"]["mean_common"][0] > 0.70
    assert rows["dmpo"]["at_0.3"] == [pytest.approx(0.80)]
    paired = bench.paired_table([early, cheap])
    cells = [c.strip() for c in paired.splitlines()[2].strip("|").split("|")]
    sdn_at_30 = 0.70 + 0.04 * (0.3 - 0.26) / (1.0 - 0.26)  # interpolated
    assert cells[0] == "sdn_linear" and cells[1] == f"{100 * (0.80 - sdn_at_30):+.2f}"


@needs_fashion_mnist
def test_costs_are_rescaled_to_static_peft_full_model():
    bench = _load_benchmark()
    static = _run("static_peft", 0, [1.0], [0.7], full=2.0)
    moment = _run("static_peft_moment", 0, [1.0], [0.8], full=2.2)
    reference, name = bench.common_cost_reference([moment, static])
    assert reference == 2.0 and "static_peft" in name
    scaled = bench.rescale_costs([moment], reference)[0]
    assert scaled["exits"][-1]["cost_fraction"] == pytest.approx(1.1)
    assert bench.accuracy_at_cost(scaled, 1.0) is None and moment["exits"][-1]["cost_fraction"] == 1.0


@needs_fashion_mnist
def test_variant_settings_come_from_the_config_files_scaled_to_the_benchmark():
    bench = _load_benchmark()
    settings = bench.Settings()
    dmpo = bench.module_kwargs("dmpo", settings, bench.MODEL_CONFIGS)
    exits = dmpo["exits"]
    assert exits["blocks"] == [3, 6, 9, 12] and exits["early_head"] == "moment" and exits["bypass"] is True
    assert dmpo["peft"]["adapter_dim"] == settings.adapter_dim and exits["moment_dim"] == settings.moment_dim
    assert "backbone" not in dmpo and "budgets" not in dmpo["evaluation"]
    assert dmpo["evaluation"]["rule"] == "confidence"
    switches = [
        bench.module_kwargs(f"switch_{p}", settings, bench.MODEL_CONFIGS)["schedule"]["switch_epoch"]
        for p in (25, 50, 75)
    ]
    assert switches == [1, 2, 3]  # 25/50/75 of 100 epochs -> of 4
    assert bench.module_kwargs("static_peft", settings, bench.MODEL_CONFIGS)["exits"]["blocks"] == 1
    names = ["dmpo", "switch_50", "exit_patience", "sdn_moment", "phase2_only"]
    jobs = bench.plan(names, settings, bench.MODEL_CONFIGS, {v: [0] for v in names})
    # identical training settings share one run: switch_50 = dmpo (switch at half), phase2_only = sdn_moment
    assert [(j.name, j.rules) for j in jobs] == [
        ("dmpo", {"confidence": ["dmpo", "switch_50"], "patience": ["exit_patience"]}),
        ("sdn_moment", {"confidence": ["sdn_moment", "phase2_only"]}),
    ]


@needs_fashion_mnist
def test_compare_curves_never_mixes_proxies(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_curves", ROOT / "benchmarks" / "compare_curves.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    path = tmp_path / "curves.csv"
    rows = ["proxy,variant,seed,kind,point,test_cost_fraction,test_accuracy"]
    for proxy, acc in (("same-labels", 0.9), ("coarse-to-fine", 0.7)):
        rows += [f"{proxy},dmpo,0,dynamic,{q},{c},{acc}" for q, c in ((0, 0.3), (1, 1.0))]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match="choose one with --proxy"):
        cc.read_curves(path)
    cost, acc = cc.read_curves(path, "coarse-to-fine")["dmpo"][0]
    assert list(acc) == [0.7, 0.7] and list(cost) == [0.3, 1.0]


@needs_fashion_mnist
@pytest.mark.slow
def test_calibration_both_tests_the_same_model_without_and_with_temperatures(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "out"
    args = [*SMALL, "--cache-dir", str(tmp_path / "cache"), "--proxy", "coarse-to-fine", "--seeds", "1"]
    payload = bench.main([*args, "--variants", "dmpo", "--calibration", "both", "--output", str(out)])
    (run,) = payload["results"]
    none, temp = run["calibration"]["none"], run["calibration"]["temperature"]
    assert none["report_dir"] != temp["report_dir"]
    # the plain run is the one the tables use; the second one really fitted a temperature per exit
    assert none["method"] == "none" and none["budgets"] == run["budgets"]
    plain = json.loads((Path(none["report_dir"]) / "report.json").read_text())
    scaled = json.loads((Path(temp["report_dir"]) / "report.json").read_text())
    assert plain["calibration"] == {"method": "none"}
    k = len(run["exits"])
    assert scaled["calibration"]["method"] == "temperature"
    assert len(scaled["calibration"]["temperatures"]) == k
    assert len(temp["ece_before"]) == len(temp["ece_after"]) == k
    # same weights: the per-exit top-1 of the argmax does not depend on a temperature
    assert temp["exit_top1"] == none["exit_top1"]
    table = (out / "calibration.md").read_text()
    assert "| none |" in table and "| temperature |" in table and table.count("| 1 |") == 1


def test_benchmark_trains_fair_variants_as_their_own_runs():
    bench = _load_benchmark()
    settings = bench.Settings()
    names = ["static_peft", "static_peft_moment", "dmpo", "dmpo_final_moment"]
    jobs = bench.plan(names, settings, bench.MODEL_CONFIGS, {v: [0] for v in names})
    assert [j.name for j in jobs] == names  # none merged with the variant it derives from
    assert (
        bench.module_kwargs("static_peft_moment", settings, bench.MODEL_CONFIGS)["exits"]["final_head"]
        == "moment"
    )
    assert set(bench.FAIR_BASELINES) <= set(bench.available_variants(bench.MODEL_CONFIGS))
