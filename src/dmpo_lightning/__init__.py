"""dmpo-lightning: inference-efficient tuning of pre-trained vision transformers (DMPO, ICCV 2025)."""

__version__ = "0.1.0"
