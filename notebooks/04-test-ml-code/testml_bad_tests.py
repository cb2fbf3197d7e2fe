"""Three tests that are green and protect almost nothing. Do not write tests like these.

Chapter 04 copies this file into a scratch folder as ``test_testml_bad.py`` and runs it against
planted bugs to show what each one lets through. Its name does not start with ``test_``, so the
repository's own test run does not collect it: a test that cannot fail is a defect, not coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from testml_data import NUMERIC, load_table, split
from testml_features import Preprocessor
from testml_model import fit

SNAPSHOT = Path(__file__).with_name("testml_snapshot.json")


@pytest.fixture(scope="module")
def tables():
    return split(load_table())


@pytest.fixture(scope="module")
def model(tables):
    return fit(tables[0])


def test_model_runs(model, tables):
    """Asserts nothing: it passes for every model that does not crash."""
    model.predict(tables[1])


def test_scale_standardises(tables):
    """Mirrors the implementation: the expected value comes from the object's own statistics."""
    frame = tables[0].head(5).assign(bill_depth_mm=18.0)  # it even covers a constant column
    pre = Preprocessor().fit(frame)
    expected = (frame[NUMERIC].to_numpy(dtype=float) - pre.means_) / pre.scales_
    np.testing.assert_allclose(pre.scale(frame), expected)


def test_predictions_match_snapshot(model, tables):
    """A snapshot: records the first answer it sees, then insists on it (like --snapshot-update)."""
    got = np.round(model.predict(tables[1].head(3)), 1).tolist()
    if not SNAPSHOT.exists():
        SNAPSHOT.write_text(json.dumps(got))
    assert got == json.loads(SNAPSHOT.read_text())
