"""The public API is pinned: a change to it is a deliberate change to this list."""

from __future__ import annotations

import attnscan

PUBLIC = {
    "EMBEDDED_NAME",
    "ArchEntry",
    "ArchFacts",
    "AttnscanError",
    "CPDetector",
    "FigureRow",
    "GridCollector",
    "LoadOptions",
    "LoadedModel",
    "ProbeDetector",
    "PromptSet",
    "RunOutput",
    "TrainedDetector",
    "ScanOptions",
    "ScanResult",
    "SetAccumulator",
    "VerdictThresholds",
    "__version__",
    "arch_facts",
    "capture_attention",
    "effects_table",
    "encode",
    "evaluate_detector",
    "from_model",
    "grid_figure",
    "layer_detection_table",
    "layer_profile_figure",
    "layer_table",
    "load_model",
    "load_prompts",
    "load_trained",
    "make_report",
    "observations",
    "register_arch",
    "run",
    "scan",
    "score_prompts",
    "train_detector",
}


def test_public_api_is_pinned() -> None:
    assert set(attnscan.__all__) == PUBLIC
    assert len(attnscan.__all__) == len(PUBLIC)
    for name in attnscan.__all__:
        assert hasattr(attnscan, name), name


HEAVY = ("matplotlib", "sklearn", "tensorly", "torch", "transformers", "pandas")


def _heavy_after(code: str) -> list[str]:
    import subprocess
    import sys

    probe = f"{code}; import sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_import_is_light() -> None:
    """Importing attnscan, or the CLI for ``--help``, loads none of the heavy libraries; a public name that needs
    torch loads it on first use (the probe itself must see it, or it could not fail)."""
    assert _heavy_after("import attnscan") == []
    assert _heavy_after("import attnscan.cli.main") == []
    assert "torch" in _heavy_after("import attnscan; attnscan.GridCollector")


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnscan.nope  # noqa: B018
    assert set(attnscan.__all__) <= set(dir(attnscan))
