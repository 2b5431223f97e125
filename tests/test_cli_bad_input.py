"""Bad input fails early with a message that names the option and what is allowed, and writes nothing.

Every case runs the CLI in-process the way a user would hit the mistake (`dmpo fit` for configuration errors,
`dmpo test/predict --ckpt_path` for checkpoint and output errors). Afterwards no checkpoint or report exists
that was not there before, and the existing checkpoint and report files are byte-for-byte unchanged (same
mtime). Configuration errors (options, budgets, learning rate, schedule, output paths, checkpoint files) fail
before any file is written at all; errors that need the checkpoint's weights or the data (class count of a
checkpoint, data layout, NaN loss) fail after Lightning created the run's log folder, but before any
checkpoint or report.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from support.builders import TINY_CONFIG

from dmpo_lightning import BenchmarkDataModule
from dmpo_lightning.cli import main
from dmpo_lightning.constants import IMAGE_KEY
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError, ConfigFileNotFoundError
from dmpo_lightning.module import DMPOModule

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
LOG_FILES = {"config.yaml", "hparams.yaml", "calibration_indices.json", "metrics.csv"}
"""What Lightning and the data module may write into a new run folder before a late error."""


class NaNImages(BenchmarkDataModule):
    """The tiny synthetic data, but every training batch is NaN (a corrupt file or a broken transform)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            batch[IMAGE_KEY] = torch.full_like(batch[IMAGE_KEY], float("nan"))
        return batch


@dataclass
class Case:
    args: Callable[[dict], list[str]]
    error: type[BaseException]
    match: str
    late: bool = False  # fails after the run folder exists (log files allowed, no checkpoint or report)
    extra: dict = field(default_factory=dict)


def fit(*options: str) -> Callable[[dict], list[str]]:
    return lambda ctx: ["fit", "-c", TINY, *(o.format(**ctx) for o in options)]


def evaluate(*options: str) -> Callable[[dict], list[str]]:
    return lambda ctx: ["test", "-c", TINY, *(o.format(**ctx) for o in options)]


def predict(*options: str) -> Callable[[dict], list[str]]:
    return lambda ctx: ["predict", "-c", TINY, *(o.format(**ctx) for o in options)]


LR = "--model.init_args.optimizer=AdamW"


CASES = {
    "exit_block_out_of_range": Case(
        fit("--model.init_args.exits.blocks=[1, 2, 5]"),
        ValueError,
        r"exit block 5 is out of range: allowed are 1\.\.4 .* or -4\.\.-1",
    ),
    "exit_blocks_unsorted": Case(
        fit("--model.init_args.exits.blocks=[2, 1, 3, 4]"),
        ValueError,
        r"exits\.blocks \[2, 1, 3, 4\] must be sorted in increasing order",
    ),
    "loss_weights_wrong_length": Case(
        fit("--model.init_args.schedule.weight_phase1=[1.0, 1.0]"),
        ValueError,
        r"weight_phase1 has 2 entries but the model has 4 exits; give one weight per exit",
    ),
    "loss_weight_negative": Case(
        fit("--model.init_args.schedule.weight_phase2=[1.0, -1.0, 1.0, 1.0]"),
        ValueError,
        r"weight_phase2 must be finite and >= 0; got \[1\.0, -1\.0, 1\.0, 1\.0\]",
    ),
    "loss_weights_all_zero": Case(
        fit("--model.init_args.schedule.weight_phase1=[0, 0, 0, 0]"),
        ValueError,
        r"weight_phase1 are all zero; at least one exit needs a positive weight",
    ),
    "switch_epoch_beyond_max_epochs": Case(
        fit("--model.init_args.schedule.switch_epoch=5"),
        ValueError,
        r"switch_epoch=5 is at or after the last epoch \(max_epochs=2.*allowed: 0\.\.1",
    ),
    "unknown_backbone": Case(
        fit("--model.init_args.backbone=vit_nonexistent_patch16_224"),
        ValueError,
        r"model\.init_args\.backbone: unknown backbone 'vit_nonexistent_patch16_224'.*similar: \[.*"
        r"'vit_tiny_patch16_224'",
    ),
    "unknown_backbone_tag": Case(
        fit("--model.init_args.backbone=vit_tiny_patch16_224.no_such_tag"),
        ValueError,
        r"model\.init_args\.backbone: .*no pretrained tag 'no_such_tag'.*allowed tags: \[.*'augreg_in21k'",
    ),
    "unknown_dataset": Case(
        fit("--data.init_args.dataset=imagenet22k"),
        SystemExit,
        r"(?s)Parser key \"dataset\".*Expected a typing\.Literal\['cifar10', .*'synthetic'\]\. "
        r"Got value: imagenet22k",
    ),
    "moment_dim_not_a_multiple_of_groups": Case(
        fit("--model.init_args.exits.moment_dim=30"),
        ValueError,
        r"^exits\.moment_dim must be a positive multiple of exits\.moment_groups=4, got 30$",
    ),
    "unknown_early_head": Case(
        fit("--model.init_args.exits.early_head=mlp"),
        SystemExit,
        r"(?s)Parser key \"exits\.early_head\".*Literal\['linear', 'moment', 'isqrt_cov'\]\. Got value: mlp",
    ),
    "missing_data_root": Case(
        fit("--data.init_args.dataset=cifar10", "--data.init_args.root={tmp}/no_such_dir"),
        ValueError,
        r"root='.*no_such_dir' for dataset 'cifar10' does not exist; expected root/cifar-10-batches-py/",
    ),
    "unset_data_root": Case(
        fit("--data.init_args.dataset=cifar10"),
        ValueError,
        r"dataset 'cifar10' needs root=<folder> laid out as root/cifar-10-batches-py/",
    ),
    "wrong_data_root": Case(  # refused when the data module is built, before a run folder exists
        fit("--data.init_args.dataset=cifar10", "--data.init_args.root={empty}"),
        FileNotFoundError,
        r"cifar10 not found under root='.*empty': expected data_batch_1.* missing: data_batch_1",
    ),
    "img_size_not_divisible_by_patch": Case(
        fit("--model.init_args.img_size=30"),
        ValueError,
        r"img_size=30 is not divisible by the patch size 8 .*allowed: multiples of 8 \(e\.g\. 24 or 32\)",
    ),
    "missing_checkpoint": Case(
        evaluate("--ckpt_path={tmp}/missing.ckpt"),
        FileNotFoundError,
        r"ckpt_path '.*missing\.ckpt' does not exist",
    ),
    "corrupt_checkpoint_random_bytes": Case(
        evaluate("--ckpt_path={corrupt}"),
        ValueError,
        r"ckpt_path '.*corrupt\.ckpt' is not a readable Lightning checkpoint",
    ),
    "truncated_checkpoint": Case(
        evaluate("--ckpt_path={truncated}"),
        ValueError,
        r"ckpt_path '.*truncated\.ckpt' is not a readable Lightning checkpoint",
    ),
    "class_count_mismatch_data_vs_checkpoint": Case(
        evaluate(
            "--ckpt_path={ckpt}",
            "--data.init_args.synthetic_num_classes=5",
            "--evaluation.report_dir={tmp}/new_report",
        ),
        ValueError,
        r"the data has 5 classes but --ckpt_path .* was trained on 4: a trained model keeps its classes",
    ),  # refused before any run folder (issue 28/9; was a loader error after the folder was made)
    "budget_below_first_exit": Case(
        evaluate(
            "--ckpt_path={ckpt}",
            "--evaluation.budgets=[0.01, 0.5]",
            "--evaluation.report_dir={tmp}/new_report",
        ),
        ValueError,
        r"budget 0\.01 \(fraction of the full model's cost\) is outside the achievable range \[0\.\d+, 1\].*"
        r"evaluation\.budgets",
    ),
    "budget_above_full_model": Case(
        evaluate(
            "--ckpt_path={ckpt}",
            "--evaluation.budgets=[0.5, 1.5]",
            "--evaluation.report_dir={tmp}/new_report",
        ),
        ValueError,
        r"budget 1\.5 \(fraction of the full model's cost\) is outside the achievable range \[0\.\d+, 1\]",
    ),
    # budgets and the report folder are checked before training when fit ends with a test
    "budget_zero_with_test_after_fit": Case(
        fit("--evaluation.budgets=[0]", "--test_after_fit=true"),
        ConfigError,
        r"budget 0\.0 \(fraction of the full model's cost\) is outside the achievable range",
    ),
    "report_dir_is_a_file_with_test_after_fit": Case(
        fit("--test_after_fit=true", "--evaluation.report_dir={corrupt}"),
        ConfigError,
        r"report_dir .*corrupt\.ckpt is a file; evaluation\.report_dir must be a folder",
    ),
    "report_dir_under_a_file": Case(
        evaluate("--ckpt_path={ckpt}", "--evaluation.report_dir={corrupt}/report"),
        ConfigError,
        r"report_dir .*corrupt\.ckpt/report cannot be created: .*corrupt\.ckpt is a file, not a folder",
    ),
    "existing_report": Case(
        evaluate("--ckpt_path={ckpt}", "--evaluation.report_dir={base}/report"),
        ConfigFileExistsError,
        r"report already holds a dmpo test report \(report\.json, .*set "
        r"evaluation\.report_dir to a new",
    ),
    "predictions_file_is_a_folder": Case(
        predict("--ckpt_path={ckpt}", "--evaluation.predictions_file={empty}"),
        ConfigError,
        r"empty is a folder; evaluation\.predictions_file must name a new file",
    ),
    "predictions_file_exists": Case(
        predict("--ckpt_path={ckpt}", "--evaluation.predictions_file={corrupt}"),
        ConfigFileExistsError,
        r"corrupt\.ckpt exists; set evaluation\.predictions_file to a new path",
    ),
    "test_without_checkpoint": Case(
        evaluate("--evaluation.report_dir={tmp}/new_report"),
        ConfigError,
        r"dmpo test would report untrained weights: no checkpoint was given, so the weights are freshly "
        r"built; .*evaluation\.allow_untrained=true",
    ),
    "predict_without_checkpoint": Case(
        predict(),
        ConfigError,
        r"dmpo predict would report untrained weights: no checkpoint was given",
    ),
    "num_classes_disagrees_with_data": Case(
        fit("--model.init_args.num_classes=7"),
        ConfigError,
        r"model\.init_args\.num_classes=7 disagrees with the data, which has 4 classes",
    ),
    "ramp_beyond_max_epochs": Case(
        fit(
            "--trainer.max_epochs=3",
            "--model.init_args.schedule.switch_epoch=1",
            "--model.init_args.schedule.ramp_epochs=2",
        ),
        ConfigError,
        r"schedule\.switch_epoch=1 with schedule\.ramp_epochs=2 reaches phase 2's weights only at epoch "
        r"3, after the last epoch 2 \(max_epochs=3\); allowed: schedule\.ramp_epochs <= 1",
    ),
    "negative_learning_rate": Case(
        fit(LR, "--model.init_args.optimizer.lr=-0.1"),
        ConfigError,
        r"model\.init_args\.optimizer: Invalid learning rate: -0\.1; the learning rate must be a "
        r"finite number >= 0",
    ),
    "nan_learning_rate": Case(
        fit(LR, "--model.init_args.optimizer.lr=.nan"),
        ConfigError,
        r"model\.init_args\.optimizer: .*learning rate.*nan.*must be a finite number >= 0",
    ),
    "checkpoint_is_a_folder": Case(
        evaluate("--ckpt_path={ckpt_dir}"),
        ConfigFileNotFoundError,
        r"ckpt_path '.*checkpoints' is a folder, not a checkpoint file; give one \.ckpt file \(its "
        r"checkpoints: "
        r"epoch=0-step=2\.ckpt\)",
    ),
    "checkpoint_is_a_bare_state_dict": Case(
        evaluate("--ckpt_path={state_dict}"),
        ConfigError,
        r"ckpt_path '.*state_dict\.pt' holds a bare state_dict "
        r"\(torch\.save\(model\.state_dict\(\)\)\), not a "
        r"Lightning checkpoint",
    ),
    "nan_loss": Case(
        fit(f"--data.class_path={__name__}.NaNImages"),
        FloatingPointError,
        r"training loss is nan at epoch 0, global step 0 .*check the inputs for NaN/inf",
        late=True,
    ),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint and a report from one tiny fit + test, plus corrupt copies of the checkpoint."""
    base = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        cli = main(
            [
                "fit",
                "-c",
                TINY,
                "--trainer.max_epochs=1",
                "--model.init_args.schedule.switch_epoch=0",
                "--test_after_fit=true",
                f"--evaluation.report_dir={base / 'report'}",
            ]
        )
    (ckpt,) = (base / cli.trainer.log_dir / "checkpoints").glob("*.ckpt")
    corrupt = base / "corrupt.ckpt"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    corrupt.write_bytes(noise.numpy().tobytes())
    truncated = base / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    empty = base / "empty"
    empty.mkdir()
    state_dict = base / "state_dict.pt"
    torch.save(DMPOModule.load_from_checkpoint(ckpt).state_dict(), state_dict)
    assert (base / "report" / "report.json").is_file()
    return {
        "base": base,
        "ckpt": ckpt,
        "ckpt_dir": ckpt.parent,
        "corrupt": corrupt,
        "truncated": truncated,
        "empty": empty,
        "state_dict": state_dict,
    }


def _snapshot(*roots: Path) -> dict[Path, tuple[int, int, str]]:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_clearly_and_writes_nothing(name, trained, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = {k: str(v) for k, v in trained.items()} | {"tmp": str(tmp_path)}
    before = _snapshot(trained["base"], tmp_path)

    with pytest.raises(case.error) as info:
        main(case.args(ctx))
    if case.error is SystemExit:  # jsonargparse rejects the value while parsing and prints why
        assert info.value.code == 2
        assert re.search(case.match, capsys.readouterr().err), name
    else:
        assert re.search(case.match, str(info.value)), str(info.value)

    after = _snapshot(trained["base"], tmp_path)
    changed = [p for p in before if before[p] != after.get(p)]
    assert not changed, changed  # the existing checkpoint, report and corrupt files are untouched
    new = sorted(p.relative_to(tmp_path) for p in after.keys() - before.keys())
    assert not [p for p in new if p.suffix == ".ckpt" or p.name in ("report.json", "thresholds.json")], new
    assert not (tmp_path / "new_report").exists()
    if case.late:
        assert all(p.name in LOG_FILES for p in new), new
    else:
        assert not new, new  # failed before Lightning created a run folder
