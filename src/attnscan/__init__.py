"""attnscan: layer-by-layer attention shifts of language models under jailbreak prompts."""

from __future__ import annotations

__version__ = "0.1.0"

from .accumulate import GridCollector, SetAccumulator
from .arch import ArchEntry, ArchFacts, arch_facts, register_arch
from .capture import capture_attention
from .errors import AttnscanError
from .models import EMBEDDED_NAME, LoadedModel, from_model, load_model
from .prompts import PromptSet, encode, load_prompts
from .result import ScanResult
from .scan import scan

__all__ = [
    "EMBEDDED_NAME",
    "ArchEntry",
    "ArchFacts",
    "AttnscanError",
    "GridCollector",
    "LoadedModel",
    "PromptSet",
    "ScanResult",
    "SetAccumulator",
    "__version__",
    "arch_facts",
    "capture_attention",
    "encode",
    "from_model",
    "load_model",
    "load_prompts",
    "register_arch",
    "scan",
]
