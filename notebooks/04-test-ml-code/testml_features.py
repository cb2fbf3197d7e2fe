"""Preprocessing for the pipeline under test: a penguin table in, the network's float32 matrix out.

Part of the small pipeline that chapter 04 (Test ML code) tests. ``Preprocessor`` learns its
statistics (medians for missing values, means and scales) in ``fit`` from training rows only, and
applies exactly those in ``transform``, on the training path and on the serving path. Columns are
selected by name, so a request with its columns in another order means the same thing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from testml_data import CATEGORIES, NUMERIC


class Preprocessor:
    """Impute, standardise and one-hot encode; every statistic comes from the rows given to ``fit``."""

    def __init__(self, numeric: list[str] = NUMERIC, categories: dict[str, list[str]] = CATEGORIES):
        self.numeric = list(numeric)
        self.categories = {column: list(values) for column, values in categories.items()}

    def measurements(self, frame: pd.DataFrame) -> np.ndarray:
        """The numeric columns as floats, found by name wherever they sit in the frame."""
        return frame[self.numeric].to_numpy(dtype=float)

    def fit(self, frame: pd.DataFrame) -> "Preprocessor":
        values = self.measurements(frame)
        self.medians_ = np.nanmedian(values, axis=0)
        filled = np.where(np.isnan(values), self.medians_, values)
        self.means_ = filled.mean(axis=0)
        std = filled.std(axis=0)
        self.scales_ = np.where(std > 0, std, 1.0)  # a constant column is centred, not divided by 0
        return self

    def scale(self, frame: pd.DataFrame) -> np.ndarray:
        """The numeric columns, missing values filled with the training medians, standardised."""
        values = self.measurements(frame)
        values = np.where(np.isnan(values), self.medians_, values)
        return (values - self.means_) / self.scales_

    def unscale(self, scaled: np.ndarray) -> pd.DataFrame:
        """The inverse of ``scale`` for rows without missing values."""
        return pd.DataFrame(scaled * self.scales_ + self.means_, columns=self.numeric)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Scaled numerics, then one column per known category (all zeros when missing or unknown)."""
        onehots = [frame[column].to_numpy(dtype=object)[:, None] == np.array(values, dtype=object)
                   for column, values in self.categories.items()]
        return np.hstack([self.scale(frame), *onehots]).astype(np.float32)

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(values) for values in self.categories.values())

    def state(self) -> dict:
        """Plain lists and strings, so a checkpoint holding it loads with ``weights_only=True``."""
        fitted = {name: getattr(self, f"{name}_").tolist() for name in ("medians", "means", "scales")}
        return {"numeric": self.numeric, "categories": self.categories, **fitted}

    @classmethod
    def from_state(cls, state: dict) -> "Preprocessor":
        pre = cls(state["numeric"], state["categories"])
        for name in ("medians", "means", "scales"):
            setattr(pre, f"{name}_", np.array(state[name], dtype=float))
        return pre
