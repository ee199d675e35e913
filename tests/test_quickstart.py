"""The README's promise: the quickstart recipe, unchanged, reaches the stated sample accuracy."""

from pathlib import Path

import pytest

from ldmkit.config import load_config
from ldmkit.train.trainer import train

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_reaches_90_colour_and_80_shape_accuracy(tmp_path):
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path / 'quickstart'}"])
    result = train(cfg, progress=False)
    ev = result.shapes_eval
    assert ev is not None and ev["n"] == cfg.eval.shapes_per_class * 18
    assert ev["colour"] >= 0.90, ev
    assert ev["shape"] >= 0.80, ev
