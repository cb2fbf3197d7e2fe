"""Regression checks for the bugs chapter 05 (Debug training) finds, one check per bug.

Each check takes a training-script module (``train_broken.py`` or ``train_fixed.py``, imported by
path) and raises ``AssertionError`` with a message that names the bug when the bug is present. The
chapter writes each check right after it finds the bug; ``tests/test_05_debug_training.py`` runs
every check against both scripts and requires it to fail on the broken one and to pass on the
fixed one, which is the proof that the check can fail at all.

This is a file because the chapter and the test suite share it. It imports nothing from the
chapter's folder, so the tests can load it by path. Nothing runs at import. From the chapter::

    import checks
    checks.check_gradients_are_fresh(fixed_module)
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn


def digits_sample(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real digits (raw pixels 0..16, float32) and their labels, drawn without replacement."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rows = np.random.default_rng(seed).choice(len(y), size=n, replace=False)
    return X[rows].astype(np.float32), y[rows].astype(np.int64)


def check_labels_follow_their_images(module) -> None:
    """Every loaded label belongs to its own image, even when the export lost a file.

    Writes a small export in which image ``i`` is filled with the value ``i`` and
    labelled ``i % 10``, with image 12 missing, loads it with the module's
    ``load_dataset``, and checks each row's label against the id its pixels carry.
    """
    ids = range(30)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        for i in ids:
            if i != 12:
                image = np.full((8, 8), i, dtype=np.uint8)
                np.save(folder / "images" / f"{i:04d}.npy", image)
        labels = pd.DataFrame({"id": ids, "label": [i % 10 for i in ids]})
        labels.to_csv(folder / "labels.csv", index=False)
        X, y = module.load_dataset(folder)
    image_ids = X[:, 0].astype(int)
    wrong = np.flatnonzero(y != image_ids % 10)
    assert len(y) == len(X) == 29, f"expected 29 images and labels: {len(X)}, {len(y)}"
    assert wrong.size == 0, (
        f"labels misaligned with their images: {wrong.size} of {len(y)} rows, "
        f"from id {image_ids[wrong][0]}")


def overfit_losses(module, steps: int = 150, lr: float = 1e-2, seed: int = 0) -> list:
    """Train the module's model on one batch of 32 digits with a plain, trusted loop.

    Dropout is off and the loop is ours (zero_grad, cross_entropy, Adam at a fixed
    rate), so the only parts under test are the module's model and its loss.
    """
    X, y = digits_sample(32, seed)
    xb = torch.as_tensor(X / 16.0)  # pixels run from 0 to 16
    yb = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = module.make_model(X.shape[1], 10, 128, 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def check_overfits_one_batch(module) -> None:
    """A model that cannot memorise 32 examples cannot learn 1,300."""
    final = overfit_losses(module)[-1]
    assert final < 0.05, f"the model cannot overfit one batch: its loss stops at {final:.3f}"


def same_batch_grad_norms(module, repeats: int = 4, seed: int = 0) -> list[float]:
    """Norm of the gradient the optimiser holds after each of ``repeats`` calls of the module's
    ``train_step`` on the same batch, with a learning rate of zero so that the weights never move.
    A step that starts from fresh gradients sees the same gradient every time."""
    X, y = digits_sample(32, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    xb, yb = torch.as_tensor(X / 16.0), torch.as_tensor(y)
    norms = []
    for _ in range(repeats):
        module.train_step(model, xb, yb, optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(math.sqrt(sum(float(g.square().sum()) for g in grads)))
    return norms


def check_gradients_are_fresh(module) -> None:
    """Each optimisation step uses the gradient of its own batch, not the sum of all past ones."""
    norms = same_batch_grad_norms(module)
    assert np.allclose(norms, norms[0], rtol=1e-5), (
        f"gradients accumulate across steps (norms {[round(n, 3) for n in norms]} for the same batch)")


def check_schedule_runs_its_course(module, epochs: int = 3, steps_per_epoch: int = 4) -> None:
    """After the epochs the schedule was built for, it has advanced once per batch to its end."""
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizer, scheduler = module.make_optimizer(model, 1e-2, epochs, steps_per_epoch)
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(steps_per_epoch)]
    for _ in range(epochs):
        module.train_one_epoch(model, batches, optimizer, scheduler, "cpu")
    steps = epochs * steps_per_epoch
    assert scheduler.last_epoch == steps, (
        f"the learning-rate schedule advanced {scheduler.last_epoch} times in {steps} optimiser steps")


def check_evaluation_is_deterministic(module) -> None:
    """Evaluating the same model on the same data twice gives the same accuracy."""
    torch.manual_seed(0)
    model = module.make_model(64, 10, 64, 0.5)
    model.train()  # the state a model is in after any training epoch
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    scores = [module.evaluate(model, X, y) for _ in range(4)]
    assert len(set(scores)) == 1, f"evaluation is random: four evaluations gave {scores}"


def check_prediction_independent_of_batch(module) -> None:
    """An example is preprocessed the same way alone as in a batch (as it arrives when served)."""
    X, _ = digits_sample(120)
    _, in_batch = module.prepare(X[:100], X[100:])
    _, alone = module.prepare(X[:100], X[100:101])
    assert np.allclose(in_batch[:1], alone, atol=1e-5), (
        "preprocessing depends on the batch: the first test example changes when it is prepared alone")


#: Every check, in the order the chapter finds the bugs; the tests parametrize over this list.
CHECKS = [
    check_labels_follow_their_images,
    check_overfits_one_batch,
    check_gradients_are_fresh,
    check_schedule_runs_its_course,
    check_evaluation_is_deterministic,
    check_prediction_independent_of_batch,
]
