"""dmpo-lightning: inference-efficient tuning of pre-trained vision transformers (DMPO, ICCV 2025)."""

__version__ = "0.1.0"

from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.schedules import TwoPhaseSchedule

__all__ = ["BenchmarkDataModule", "DMPOModule", "MultiExitViT", "TwoPhaseSchedule", "__version__"]
