"""Exact PyTorch reference of DeepSeek V4 (Flash / Pro).

Self-contained: imports nothing from corruptcheck, so an engine team can vendor it.
Installed as `corruptcheck.reference`.
"""
from .config import PRESETS, V4_FLASH, V4_PRO, ModelConfig
from .model import ENTRY_POINTS, RunResult, run
from .precision import Precision

REFERENCE_VERSION = "1.0.0"

__all__ = ["ModelConfig", "PRESETS", "V4_FLASH", "V4_PRO", "Precision", "run", "RunResult",
           "ENTRY_POINTS", "REFERENCE_VERSION"]
