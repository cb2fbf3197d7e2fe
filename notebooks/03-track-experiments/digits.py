"""The model the chapter tracks: a small MLP on scikit-learn's 8x8 digits, trained with SGD.

Kept in a file, not in the notebook, for two reasons: the tracking helper records a hash of this
file as the code version of every run, and ``rerun.py`` imports it to retrain a logged run in a
fresh process. It knows nothing about MLflow. The data ships inside scikit-learn (no download).

Used from the chapter (its working directory is this folder)::

    import digits
    data = digits.load_splits()
    model, history = digits.train(digits.Config(lr=0.1, hidden=64, weight_decay=1e-4, seed=0), data)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Config:
    """Everything that decides what a training run computes, apart from the data and the code."""

    lr: float
    hidden: int
    weight_decay: float
    seed: int | None  # None: the global RNG decides (the mistake the chapter shows)
    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.9


def load_splits(split_seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as float32 pixels in [0, 1] and int64 labels, split 60/20/20 with stratification."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, test_size=0.4, stratify=y, random_state=split_seed)
    X_val, X_test, y_val, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=split_seed)
    return {"X_train": X_train, "y_train": y_train, "X_val": X_val, "y_val": y_val,
            "X_test": X_test, "y_test": y_test}


def build_model(config: Config, n_features: int = 64, n_classes: int = 10) -> nn.Sequential:
    """One hidden layer of ``config.hidden`` units. A plain Sequential: nothing custom to import on load."""
    return nn.Sequential(nn.Linear(n_features, config.hidden), nn.ReLU(), nn.Linear(config.hidden, n_classes))


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of ``model`` on ``X``, ``y``."""
    model.eval()
    logits = model(torch.from_numpy(X))
    target = torch.from_numpy(y)
    loss = nn.functional.cross_entropy(logits, target).item()
    accuracy = (logits.argmax(dim=1) == target).double().mean().item()
    return float(loss), float(accuracy)


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Logits as a NumPy array (works for the trained module and for the one MLflow reloads)."""
    try:
        model.eval()
    except NotImplementedError:  # a torch.export module as MLflow reloads it: already inference-only
        pass
    return model(torch.from_numpy(X)).numpy()


def train(config: Config, data: dict[str, np.ndarray],
          on_epoch: Callable[[int, dict[str, float]], None] | None = None):
    """Train on ``data['X_train']`` and measure on ``data['X_val']`` after every epoch.

    The seed decides both the initial weights and the shuffling, and the global RNG is left as it
    was (``fork_rng``), so a run does not change the runs after it. With ``seed=None`` the global
    RNG decides and moves on, as in most hand-written loops: the run cannot be repeated. Returns ``(model, history)``, one dict per epoch.
    """
    X = torch.from_numpy(data["X_train"])
    y = torch.from_numpy(data["y_train"])
    seeded = config.seed is not None
    with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(config.seed)
        model = build_model(config, X.shape[1], int(y.max()) + 1)
        order = torch.Generator()
        order.manual_seed(config.seed if seeded else int(torch.randint(2**62, ()).item()))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    history = []
    for epoch in range(config.epochs):
        model.train()
        total, perm = 0.0, torch.randperm(len(X), generator=order)
        for start in range(0, len(X), config.batch_size):
            idx = perm[start:start + config.batch_size]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_loss, val_acc = evaluate(model, data["X_val"], data["y_val"])
        history.append({"train_loss": total / len(X), "val_loss": val_loss, "val_acc": val_acc})
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return model, history
