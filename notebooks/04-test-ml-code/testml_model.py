"""The model end of the pipeline under test: train a small network, wrap it, save it, serve it.

Part of the small pipeline that chapter 04 (Test ML code) tests. ``fit`` turns a training table into
a ``MassModel``: the fitted ``Preprocessor``, a two-layer network and the target's scale, kept
together and saved together, so the serving path (``predict_records``) cannot preprocess a request
differently from the way the training rows were preprocessed. The network predicts a penguin's body
mass in grams; it is tiny on purpose and trains on the CPU in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from testml_data import TARGET
from testml_features import Preprocessor


def make_net(n_features: int, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def train_network(features: np.ndarray, target: np.ndarray, *, seed: int = 0, epochs: int = 40,
                  batch_size: int = 64, lr: float = 5e-3, hidden: int = 32) -> tuple[nn.Sequential, list[float]]:
    """Minibatch Adam on a standardised target; the net and the mean training loss of each epoch."""
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching global state
        torch.manual_seed(seed)
        net = make_net(features.shape[1], hidden)
    order_rng = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(x), generator=order_rng).split(batch_size):
            optimizer.zero_grad()
            loss = F.mse_loss(net(x[batch]).squeeze(-1), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
    return net, losses


class MassModel:
    """The model wrapper: one fitted preprocessor, one network, one target scale, one file."""

    def __init__(self, preprocessor: Preprocessor, net: nn.Sequential, y_mean: float, y_scale: float):
        self.preprocessor, self.net = preprocessor, net.eval()
        self.y_mean, self.y_scale = float(y_mean), float(y_scale)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            z = self.net(torch.as_tensor(features, dtype=torch.float32)).squeeze(-1)
        return z.double().numpy() * self.y_scale + self.y_mean

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Body mass in grams, one value per row of ``frame``; columns are found by name."""
        return self.predict_features(self.preprocessor.transform(frame))

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-save leaves the previous file, never half of a new one."""
        path = Path(path)
        checkpoint = {"preprocessor": self.preprocessor.state(), "net": self.net.state_dict(),
                      "hidden": self.net[0].out_features, "y_mean": self.y_mean, "y_scale": self.y_scale}
        partial = path.with_name(path.name + ".partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> "MassModel":
        checkpoint = torch.load(path, weights_only=True)  # plain data and tensors, no pickled code
        pre = Preprocessor.from_state(checkpoint["preprocessor"])
        net = make_net(pre.n_features, checkpoint["hidden"])
        net.load_state_dict(checkpoint["net"])
        return cls(pre, net, checkpoint["y_mean"], checkpoint["y_scale"])


def fit(train: pd.DataFrame, *, seed: int = 0, **training) -> MassModel:
    """Fit the preprocessor on ``train`` only, then the network on what it produces."""
    pre = Preprocessor().fit(train)
    y = train[TARGET].to_numpy(dtype=float)
    y_mean, y_scale = y.mean(), y.std()
    net, losses = train_network(pre.transform(train), (y - y_mean) / y_scale, seed=seed, **training)
    model = MassModel(pre, net, y_mean, y_scale)
    model.losses = losses
    return model


def predict_records(model: MassModel, records: list[dict]) -> list[float]:
    """The serving path: JSON-like records in, grams out, through the model's own preprocessor."""
    frame = pd.DataFrame.from_records(records)
    needed = [*model.preprocessor.numeric, *model.preprocessor.categories]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise ValueError(f"records lack the field(s) {missing}; every record needs {needed}")
    return model.predict(frame).tolist()
