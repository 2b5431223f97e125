"""Runs the docstring examples of the public modules (schedule, threshold search, metrics, ...)."""

import doctest
import importlib

import pytest

MODULES = [
    "dmpo_lightning.schedules",
    "dmpo_lightning.optim",
    "dmpo_lightning.losses",
    "dmpo_lightning.callbacks",
    "dmpo_lightning.models.backbone",
    "dmpo_lightning.models.heads",
    "dmpo_lightning.models.adapters",
    "dmpo_lightning.evaluation.protocol",
    "dmpo_lightning.models.exit_rules",
    "dmpo_lightning.evaluation.metrics",
    "dmpo_lightning.evaluation.report",
    "dmpo_lightning.models.registry",
    "dmpo_lightning.models.checks",
    "dmpo_lightning.files",
    "dmpo_lightning.options",
    "dmpo_lightning.serve.replicas",
    "dmpo_lightning.predictions",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples: add one or drop it from MODULES"
    assert result.failed == 0


def test_schedule_and_threshold_search_have_examples():
    finder = doctest.DocTestFinder()
    for name in ("dmpo_lightning.schedules", "dmpo_lightning.evaluation.protocol"):
        tests = finder.find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) >= 3, name


def test_config_error_examples():
    import doctest

    import dmpo_lightning.errors

    assert doctest.testmod(dmpo_lightning.errors).failed == 0
