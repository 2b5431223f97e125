"""Helpers shared by the test modules: fake dataset writers (``fakes``), tiny model builders (``builders``).

Import them as ``from support.fakes import write_cifar`` (``tests/`` is on ``sys.path`` under pytest); test
modules never import from each other or from ``conftest``.
"""
