"""dmpo-lightning: inference-efficient tuning of pre-trained vision transformers (DMPO, ICCV 2025)."""

__version__ = "0.1.0"

from dmpo_lightning.data import BenchmarkDataModule  # noqa: E402
from dmpo_lightning.models import MultiExitViT  # noqa: E402
from dmpo_lightning.module import DMPOModule  # noqa: E402
from dmpo_lightning.schedules import TwoPhaseSchedule  # noqa: E402

__all__ = ["BenchmarkDataModule", "DMPOModule", "MultiExitViT", "TwoPhaseSchedule", "__version__"]
