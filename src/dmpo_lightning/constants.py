"""Names shared across the package: batch keys and parameter-name prefixes."""

IMAGE_KEY = "image"
"""Batch key of the image tensor ``[B, C, H, W]``."""

LABEL_KEY = "label"
"""Batch key of the integer class labels ``[B]``."""

INDEX_KEY = "index"
"""Batch key of each sample's index in its split ``[B]`` (used to drop DDP padding duplicates)."""

PATH_KEY = "path"
"""Batch key of each image file's absolute path (a list of ``str``; ``dmpo predict`` on image files)."""

ERROR_KEY = "error"
"""Batch key of why an image file could not be used (``""`` when it was read)."""

SOURCE_MODE_KEY = "source_mode"
"""Batch key of an image file's PIL mode when it was converted to the model's channels (``""`` otherwise)."""

PEFT_PREFIX = "peft_"
"""Every trainable parameter PEFT adds inside the trunk has a name component starting with this."""

EXITS_ATTR = "exits"
"""Attribute of :class:`~dmpo_lightning.models.MultiExitViT` holding the exit heads."""

SPLIT_KEY = "split"
"""Batch key naming each sample's split (``"train"``, ``"calibration"`` or ``"test"``; a list of ``str``
after collation). ``DMPOModule.test_step`` tells the test and calibration loaders apart by it."""

ARCHITECTURE_KEYS = ("num_classes", "exits.blocks", "exits.early_head", "exits.final_head", "peft.method")
"""Options a checkpoint must share with the model it is loaded into (else: a clear error), named as a user
writes them (``exits.blocks`` is the ``blocks`` field of the ``exits`` group)."""

MODEL_FINGERPRINT_KEYS = ("backbone", *ARCHITECTURE_KEYS)
"""The hyperparameters that identify a trained model's architecture in thresholds files and exports."""

THRESHOLDS_FINGERPRINT_KEYS = MODEL_FINGERPRINT_KEYS
"""What a ``thresholds.json`` records and must match to be reused (its exit rule is recorded beside it)."""

THRESHOLDS_FORMAT = "dmpo-thresholds"
"""The ``format`` field of a ``thresholds.json`` written by ``dmpo test``."""
THRESHOLDS_FORMAT_VERSION = 2
"""Its ``format_version``; other versions are refused (version 1 fingerprinted under other names)."""

REPORT_FORMAT = "dmpo-report"
"""The ``format`` field of a ``report.json`` written by ``dmpo test``."""
REPORT_FORMAT_VERSION = 3
"""Its ``format_version`` (1 had no ``format`` field; 3 added the ``data`` and ``environment`` entries)."""
