"""Comparisons of prediction outputs shared by the tests of the surfaces that write them."""

from __future__ import annotations

import csv
import io
import math


def assert_same_csv(a: str | None, b: str | None) -> None:
    """Same header, rows, order and decisions; confidence and score within float32 noise."""
    assert a is not None and b is not None
    ra, rb = list(csv.DictReader(io.StringIO(a))), list(csv.DictReader(io.StringIO(b)))
    assert a.splitlines()[0] == b.splitlines()[0] and len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for key in x:
            if key in ("confidence", "score") and x[key] and y[key]:
                assert math.isclose(float(x[key]), float(y[key]), abs_tol=1e-5, rel_tol=0), (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)
