"""The one predictions schema: the row every surface outputs, its CSV file and its printed summary.

``dmpo predict`` (the Lightning prediction writer), :class:`~dmpo_lightning.deploy.EarlyExitPredictor`,
``python -m dmpo_lightning.deploy`` and the HTTP server all produce :class:`PredictionRow` objects, write
them with :func:`write_predictions`, print :func:`format_prediction_summary` and (the server) send
:meth:`PredictionRow.to_dict`, whose keys are the CSV's column names.

Columns, in order:

- the sample: ``path`` (an image file, absolute path, symbolic links kept) or ``index`` and ``label`` (a
  sample of a dataset split: its position in the split and its true class, when known);
- :data:`PREDICTION_COLUMNS`: ``class_index``, ``class_name``, ``exit`` (numbered from 1, as in the
  ``dmpo test`` report), ``confidence`` (softmax probability of the predicted class at that exit),
  ``score`` (the exit rule's score that was compared with the exit's threshold; equals ``confidence`` for
  the ``confidence`` rule), ``gflops`` (the counted cost ``C_k`` of that exit: embedding, blocks and every
  head up to it) and ``error`` (why the sample could not be predicted, one plain sentence; then every
  prediction column is empty).

Numbers are written with full precision (Python's shortest round-trip ``repr``), so :func:`read_predictions`
gives back exactly the floats that were written. Imports only the standard library, torch and
the base modules :mod:`dmpo_lightning.files` and :mod:`dmpo_lightning.constants`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from dmpo_lightning.constants import ERROR_KEY, INDEX_KEY, LABEL_KEY, PATH_KEY, SOURCE_MODE_KEY
from dmpo_lightning.files import atomic_write

__all__ = [
    "ID_COLUMNS",
    "IMAGE_COLUMNS",
    "PREDICTION_COLUMNS",
    "SAMPLE_COLUMNS",
    "PredictionRow",
    "PredictionSummary",
    "error_sentence",
    "format_prediction_summary",
    "read_predictions",
    "rows_from_outputs",
    "summarize",
    "write_predictions",
]

PREDICTION_COLUMNS = ("class_index", "class_name", "exit", "confidence", "score", "gflops", "error")
"""The columns after the sample's identity, in every predictions CSV and every row's JSON form."""

ID_COLUMNS = ("path", "index", "label")
"""The columns that identify a sample: an image file's ``path``, or a dataset sample's ``index`` and
``label``; a file has the ones its rows set."""

IMAGE_COLUMNS = ("path", *PREDICTION_COLUMNS)
"""Header of the predictions of image files."""

SAMPLE_COLUMNS = ("index", "label", *PREDICTION_COLUMNS)
"""Header of the predictions of a labelled dataset split."""

_INT_COLUMNS = ("index", "label", "class_index", "exit")
_FLOAT_COLUMNS = ("confidence", "score", "gflops")


@dataclass(frozen=True)
class PredictionRow:
    """One sample's early-exit prediction (or why it has none).

    Attributes:
        class_index: Predicted class; ``None`` when ``error`` is set.
        class_name: Name of that class.
        exit: Exit the sample left at, numbered from 1 as in the ``dmpo test`` report.
        confidence: Softmax probability of the predicted class at that exit.
        score: The exit rule's score at that exit (compared with its threshold).
        gflops: GFLOPs the sample cost: the counted cost ``C_k`` of its exit.
        error: Why the sample was not predicted (one sentence), ``None`` when it was.
        path: The image file (absolute path), for rows of image files.
        index: Position of the sample in its dataset split, for rows of a split.
        label: The sample's true class, when known.
        source_mode: The image's own PIL mode when it was converted to the model's channels (``"RGBA"``,
            ``"I;16"``...), else ``""``. Not a column: :func:`format_prediction_summary` counts it.
    """

    class_index: int | None
    class_name: str | None
    exit: int | None
    confidence: float | None
    score: float | None
    gflops: float | None
    error: str | None = None
    path: str | None = None
    index: int | None = None
    label: int | None = None
    source_mode: str = field(default="", compare=False, repr=False)

    @classmethod
    def failed(
        cls,
        error: str,
        *,
        path: str | None = None,
        index: int | None = None,
        label: int | None = None,
    ) -> PredictionRow:
        """A row without prediction: ``error`` says why."""
        return cls(None, None, None, None, None, None, error=error, path=path, index=index, label=label)

    @property
    def id_columns(self) -> tuple[str, ...]:
        """``("path",)`` for an image file, ``("index", "label")`` / ``("index",)`` for a dataset sample."""
        return tuple(c for c in ID_COLUMNS if getattr(self, c) is not None)

    @property
    def columns(self) -> tuple[str, ...]:
        """This row's columns: its identity columns, then :data:`PREDICTION_COLUMNS`."""
        return (*self.id_columns, *PREDICTION_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict keyed by its CSV column names (``None`` for an empty cell).

        Example:
            >>> row = PredictionRow(2, "cat", 1, 0.75, 0.75, 0.125, path="/x/a.png")
            >>> row.to_dict()  # doctest: +NORMALIZE_WHITESPACE
            {'path': '/x/a.png', 'class_index': 2, 'class_name': 'cat', 'exit': 1,
             'confidence': 0.75, 'score': 0.75, 'gflops': 0.125, 'error': None}
            >>> PredictionRow.from_dict(row.to_dict()) == row
            True
        """
        return {c: getattr(self, c) for c in self.columns}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictionRow:
        """Inverse of :meth:`to_dict` (also reads a :func:`read_predictions` CSV record of strings)."""
        values: dict[str, Any] = {}
        for column in (*ID_COLUMNS, *PREDICTION_COLUMNS):
            raw = data.get(column)
            if raw is None or raw == "":
                values[column] = None
            elif column in _INT_COLUMNS:
                values[column] = int(raw)
            elif column in _FLOAT_COLUMNS:
                values[column] = float(raw)
            else:
                values[column] = str(raw)
        return cls(**values)


def error_sentence(err: BaseException) -> str:
    """The ``error`` cell for an exception: its message as one line, without the exception's type name.

    A message that is empty gets a generic sentence; a library message of one word or code (PIL's
    ``Truncated File Read``) is prefixed with what failed.
    """
    message = " ".join(str(err).split())
    if isinstance(err, KeyError) and len(err.args) == 1:
        message = str(err.args[0])
    if not message:
        return "the image could not be read"
    if isinstance(err, ValueError):
        return message
    return f"the image could not be read: {message}"


def _cell(value: Any) -> Any:
    return "" if value is None else value


def _write_csv(
    stream: IO[bytes], first: PredictionRow, rest: Iterator[PredictionRow], stats: _Counter
) -> None:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    writer = csv.writer(text)
    columns = first.columns
    writer.writerow(columns)
    for row in _chain(first, rest):
        if row.columns != columns:
            raise ValueError(
                f"predictions rows of two kinds in one file: columns {list(row.columns)} after "
                f"{list(columns)}"
            )
        writer.writerow([_cell(getattr(row, c)) for c in columns])
        stats.add(row)
    text.flush()
    text.detach()


def _chain(first: PredictionRow, rest: Iterator[PredictionRow]) -> Iterator[PredictionRow]:
    yield first
    yield from rest


@dataclass
class PredictionSummary:
    """What :func:`format_prediction_summary` prints about a predictions file.

    Attributes:
        path: The file written (``None`` when the rows were only counted).
        rows: Samples (rows).
        predicted: Rows with a prediction.
        failed: ``(path or index, error)`` of every row without one, in order.
        exit_counts: Rows per exit (exit 1 first).
        mean_gflops: Mean GFLOPs per predicted sample (NaN when none was predicted).
        converted: Rows per source image mode, of the images converted to the model's channels.
    """

    path: str | None
    rows: int
    predicted: int
    failed: list[tuple[Any, str]]
    exit_counts: list[int]
    mean_gflops: float
    converted: dict[str, int]


class _Counter:
    """Counts rows as they are written (the writer streams; rows are not kept)."""

    def __init__(self, num_exits: int) -> None:
        self.rows = 0
        self.spent = 0.0
        self.failed: list[tuple[Any, str]] = []
        self.exit_counts = [0] * num_exits
        self.converted: dict[str, int] = {}

    def add(self, row: PredictionRow) -> None:
        self.rows += 1
        if row.error is not None:
            self.failed.append((row.path if row.path is not None else row.index, row.error))
        elif row.exit is not None:
            if not 1 <= row.exit <= len(self.exit_counts):
                raise ValueError(
                    f"prediction row with exit {row.exit}; the model has {len(self.exit_counts)} exits"
                )
            self.exit_counts[row.exit - 1] += 1
            self.spent += float(row.gflops or 0.0)
        if row.source_mode:
            self.converted[row.source_mode] = self.converted.get(row.source_mode, 0) + 1

    def summary(self, path: str | None) -> PredictionSummary:
        predicted = sum(self.exit_counts)
        return PredictionSummary(
            path=path,
            rows=self.rows,
            predicted=predicted,
            failed=self.failed,
            exit_counts=self.exit_counts,
            mean_gflops=self.spent / predicted if predicted else math.nan,
            converted=dict(sorted(self.converted.items())),
        )


def write_predictions(
    path: str, rows: Iterable[PredictionRow], *, num_exits: int
) -> PredictionSummary | None:
    """Write prediction rows as a CSV, atomically, never over an existing file.

    The rows are streamed to a temporary file next to ``path`` that appears under its name only when
    complete (a full disk or an interrupt leaves nothing), and it is refused if ``path`` exists by then.

    Args:
        path: The new CSV file.
        rows: Rows of one kind (all image files, or all dataset samples), in output order.
        num_exits: The model's number of exits (for the per-exit counts).

    Returns:
        The counts :func:`format_prediction_summary` prints, or ``None`` when there was no row (then no file
        is written).

    Raises:
        FileExistsError: If ``path`` exists (nothing is written).
        ValueError: If rows of different kinds are mixed.
    """
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return None
    stats = _Counter(num_exits)
    atomic_write(path, lambda f: _write_csv(f, first, iterator, stats), overwrite=False)
    return stats.summary(path)


def summarize(rows: Iterable[PredictionRow], *, num_exits: int) -> PredictionSummary:
    """The counts of :func:`write_predictions` without writing a file (for rows sent elsewhere)."""
    stats = _Counter(num_exits)
    for row in rows:
        stats.add(row)
    return stats.summary(None)


def read_predictions(path: str) -> list[PredictionRow]:
    """Read a predictions CSV written by :func:`write_predictions`, checked whole.

    Raises:
        FileNotFoundError: If the file is missing or a folder.
        ValueError: If it is not a predictions file (not UTF-8 text, another header), or truncated or corrupt
            (a row with another number of cells than the header, a value of the wrong type, no line break
            after the last row); one sentence naming the file and the row.
    """
    if os.path.isdir(path):
        raise FileNotFoundError(f"predictions file {path} is a folder; give the predictions CSV in it")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a dmpo predictions file: it is not UTF-8 text ({err.reason})"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, ()))
    ids = header[: len(header) - len(PREDICTION_COLUMNS)]
    if header[len(ids) :] != PREDICTION_COLUMNS or not ids or not set(ids) <= set(ID_COLUMNS):
        raise ValueError(
            f"{path} is not a dmpo predictions file: its header is {list(header)[:12]}, expected "
            f"{list(IMAGE_COLUMNS)} or {list(SAMPLE_COLUMNS)}"
        )
    if not text.endswith("\n"):  # the writer ends every row with a line break
        raise ValueError(f"{path} is truncated: its last row ends without a line break; predict again")
    rows = []
    for number, cells in enumerate(reader, start=1):
        try:
            if len(cells) != len(header):
                raise ValueError(f"it has {len(cells)} cells, the header {len(header)}")
            rows.append(PredictionRow.from_dict(dict(zip(header, cells, strict=True))))
        except ValueError as err:
            raise ValueError(
                f"{path} is corrupt: its row {number} is not a predictions row ({err})"
            ) from None
    return rows


def rows_from_outputs(
    outputs: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    exit_gflops: Sequence[float],
) -> Iterator[PredictionRow]:
    """Rows from ``DMPOModule.predict_step``'s per-batch result dicts.

    Each dict holds per-sample ``prediction``, ``exit_index`` (0-based), ``score`` and ``confidence``, and
    either ``path`` (image files, with ``error`` and ``source_mode``) or ``index`` (and ``label``) of a
    dataset split. A sample with a non-empty ``error`` gets a row without prediction.
    """

    def values(batch: Mapping[str, Any], key: str) -> list[Any]:
        v = batch[key]
        return v.tolist() if isinstance(v, torch.Tensor) else list(v)

    for batch in outputs:
        n = len(values(batch, "prediction"))
        pred, exits = values(batch, "prediction"), values(batch, "exit_index")
        score, conf = values(batch, "score"), values(batch, "confidence")
        paths = values(batch, PATH_KEY) if PATH_KEY in batch else None
        index = values(batch, INDEX_KEY) if paths is None and INDEX_KEY in batch else None
        labels = values(batch, LABEL_KEY) if paths is None and LABEL_KEY in batch else None
        errors = values(batch, ERROR_KEY) if ERROR_KEY in batch else [""] * n
        modes = values(batch, SOURCE_MODE_KEY) if SOURCE_MODE_KEY in batch else [""] * n
        for i in range(n):
            ident: dict[str, Any] = {
                "path": None if paths is None else paths[i],
                "index": None if index is None else int(index[i]),
                "label": None if labels is None else int(labels[i]),
            }
            if errors[i]:
                yield PredictionRow.failed(errors[i], **ident)
                continue
            k, c = int(exits[i]), int(pred[i])
            yield PredictionRow(
                class_index=c,
                class_name=str(class_names[c]),
                exit=k + 1,
                confidence=float(conf[i]),
                score=float(score[i]),
                gflops=float(exit_gflops[k]),
                **ident,
                source_mode=modes[i] or "",
            )


def format_prediction_summary(
    summary: PredictionSummary, *, full_gflops: float, in_chans: int, budget: float | None = None
) -> str:
    """The lines every predicting command prints at the end: rows per exit, mean cost, failed rows.

    Args:
        summary: What :func:`write_predictions` (or :func:`summarize`) returned.
        full_gflops: The full model's counted cost (the mean cost is also given as a fraction of it).
        in_chans: The model's input channels (names what converted images were converted to).
        budget: The calibrated budget the thresholds are of, if any.
    """
    n, done = summary.rows, summary.predicted
    where = f" written to {summary.path}" if summary.path is not None else ""
    at = f" at budget {budget:g}" if budget is not None else ""
    text = [f"early-exit predictions{at} for {n} {'image' if n == 1 else 'images'}{where}"]
    if done:
        counts = ", ".join(f"exit {k + 1}: {c}" for k, c in enumerate(summary.exit_counts))
        mean = summary.mean_gflops
        text.append(f"  {done} predicted; {counts}")
        text.append(
            f"  mean cost {mean:.4g} GFLOPs per image ({100 * mean / full_gflops:.1f}% of the full "
            f"model's {full_gflops:.4g})"
        )
    failed = summary.failed
    if failed:
        shown = "; ".join(f"{p}: {reason}" for p, reason in failed[:3]) + (" ..." if len(failed) > 3 else "")
        text.append(f"  {len(failed)} not predicted (the reason is in the error column): {shown}")
    converted = summary.converted
    if converted:
        count = sum(converted.values())
        target = "grey (L)" if in_chans == 1 else "RGB"
        modes = ", ".join(f"{m}: {c}" for m, c in sorted(converted.items()))
        text.append(
            f"  {count} {'image' if count == 1 else 'images'} converted to {target} from another channel "
            f"layout ({modes}) for the model's {in_chans} input channels, as the training images are"
        )
    return "\n".join(text)
