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


def test_import_is_light() -> None:
    """Importing attnscan loads neither matplotlib nor scikit-learn nor tensorly (they load when used)."""
    import subprocess
    import sys

    code = "import sys, attnscan; print(sorted(m for m in ('matplotlib', 'sklearn', 'tensorly') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
