"""Train a small network on the scikit-learn digits: the script after chapter 05 debugged it.

This is ``train_broken.py`` with every bug that chapter 05 (Debug training) found fixed, one change
per bug and nothing else, so that the diff of the two files is the list of fixes. Each change
carries a comment that starts with ``FIX``.

It is a file and not a notebook cell because a training script is a program you run as its own
process, with flags, and whose last line you read; the chapter and the tests do exactly that, and
they also import it to test its functions one at a time.

Launch (the GPU when one is present, else the CPU; the last line printed is one JSON object)::

    python train_fixed.py
    python train_fixed.py --epochs 10 --device cpu
    python train_fixed.py --seed 1   # the chapter passes the book's seed (GRADIENT_RAGE_SEED)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "artifacts" / "digits"
LOST_ID = 1600  # the image our copy of the export lost: the data fault we were handed
NOISE = 0.3  # standard deviation of the Gaussian noise added to each standardised training pixel


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the weights, the shuffle and the noise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="exported there on first use")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answer --help and reject bad flags before the slow imports below

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn


def export_digits(data_dir: Path = DATA_DIR) -> Path:
    """Write the digits in the layout the labelling team delivers: images/<id>.npy and labels.csv.

    One 8x8 image per file, one row per image in labels.csv (id, label). The image ``LOST_ID`` is
    not written: the copy we received lost it. The export goes to a temporary folder that is
    renamed into place, so no reader ever sees half of it.
    """
    from sklearn.datasets import load_digits

    data_dir = Path(data_dir)
    if (data_dir / "labels.csv").exists():
        return data_dir
    digits = load_digits()
    tmp = data_dir.with_name(f"{data_dir.name}.tmp-{time.time_ns()}")
    (tmp / "images").mkdir(parents=True)
    for i, image in enumerate(digits.images.astype(np.uint8)):
        if i != LOST_ID:
            np.save(tmp / "images" / f"{i:04d}.npy", image)
    labels = pd.DataFrame({"id": range(len(digits.target)), "label": digits.target})
    labels.to_csv(tmp / "labels.csv", index=False)
    try:
        tmp.rename(data_dir)
    except OSError:  # another process finished the same export first
        import shutil

        shutil.rmtree(tmp)
    return data_dir


def load_dataset(data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (n, 64) from images/*.npy, labels from labels.csv, joined on the id."""
    paths = sorted((Path(data_dir) / "images").glob("*.npy"))
    labels = pd.read_csv(Path(data_dir) / "labels.csv")
    # FIX misaligned labels: join on the id, never by position; name what is dropped
    ids = [int(path.stem) for path in paths]
    images = pd.DataFrame({"id": ids, "path": [str(path) for path in paths]})
    rows = labels.merge(images, how="outer", on="id", validate="one_to_one",
                        indicator=True)
    unmatched = rows.loc[rows["_merge"] != "both", "id"].tolist()
    if unmatched:
        print(f"dropped {len(unmatched)} id(s) without both an image and a label: "
              f"{unmatched[:10]}", file=sys.stderr)
    rows = rows[rows["_merge"] == "both"]
    pixels = [np.load(path).reshape(-1) for path in rows["path"]]
    return np.stack(pixels).astype(np.float32), rows["label"].to_numpy(np.int64)


def split(X: np.ndarray, y: np.ndarray, seed: int):
    """A stratified 75/25 train/test split: X_train, X_test, y_train, y_test."""
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)


def prepare(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise every pixel to zero mean and unit variance, with the training set's statistics."""
    scaler = StandardScaler().fit(X_train)  # FIX test-set statistics: fit on train only, apply to both
    return scaler.transform(X_train), scaler.transform(X_test)


class BatchLoader:
    """Whole batches cut from tensors built once, with Gaussian pixel noise."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch_size: int, noise: float,
                 seed: int):
        self.X = torch.as_tensor(X, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.batch_size, self.noise = batch_size, noise
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator)
        for batch in order.split(self.batch_size):
            pixels = self.X[batch]
            yield pixels + self.noise * torch.randn(pixels.shape), self.y[batch]


def make_loader(X: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Shuffled training batches with noise augmentation."""
    return BatchLoader(X, y, batch_size, NOISE, seed)  # FIX slow input pipeline: one tensor op per batch


def make_model(n_features: int, n_classes: int, hidden: int, dropout: float) -> nn.Module:
    """A perceptron with two hidden layers that outputs logits (softmax them for probabilities)."""
    return nn.Sequential(
        nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, n_classes),  # FIX softmax before the loss: cross_entropy expects logits
    )


def make_optimizer(model: nn.Module, lr: float, epochs: int, steps_per_epoch: int):
    """Adam under a one-cycle schedule: warm up to ``lr``, then anneal towards zero."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    return optimizer, schedule


def train_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, optimizer) -> float:
    """One optimisation step on one batch; returns the batch loss."""
    optimizer.zero_grad(set_to_none=True)  # FIX missing zero_grad: gradients summed over all steps
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, device) -> float:
    """One pass over the training batches; returns the mean batch loss."""
    model.train()
    losses = []
    for xb, yb in loader:
        losses.append(train_step(model, xb.to(device), yb.to(device), optimizer))
        scheduler.step()  # FIX schedule stepped per epoch: OneCycleLR counts batches
    return float(np.mean(losses))


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the model's predictions on (X, y)."""
    model.eval()  # FIX dropout at evaluation: eval mode turns dropout off
    with torch.no_grad():
        return (model(X).argmax(dim=1) == y).float().mean().item()


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def run(epochs=30, lr=3e-3, batch_size=64, hidden=128, dropout=0.3, seed=0, device="auto",
        data_dir=DATA_DIR):
    """Load, split, train, test; return (summary, model, raw split X_train, X_test, y_train, y_test)."""
    torch.manual_seed(seed)
    device = pick_device(str(device))
    X, y = load_dataset(export_digits(data_dir))
    X_train, X_test, y_train, y_test = split(X, y, seed)
    Z_train, Z_test = prepare(X_train, X_test)
    loader = make_loader(Z_train, y_train, batch_size, seed)
    model = make_model(X.shape[1], int(y.max()) + 1, hidden, dropout).to(device)
    optimizer, scheduler = make_optimizer(model, lr, epochs, len(loader))
    history = {"loss": [], "lr": []}
    for _ in range(epochs):
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history["loss"].append(train_one_epoch(model, loader, optimizer, scheduler, device))
    Z_test = torch.as_tensor(Z_test, dtype=torch.float32, device=device)
    accuracy = evaluate(model, Z_test, torch.as_tensor(y_test, device=device))
    summary = {"test_accuracy": accuracy, "n_train": len(y_train), "n_test": len(y_test),
               "epochs": epochs, "device": device.type, "history": history}
    return summary, model, (X_train, X_test, y_train, y_test)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    summary, _, _ = run(args.epochs, args.lr, args.batch_size, args.hidden, args.dropout,
                        args.seed, args.device, args.data_dir)
    print(f"test accuracy {summary['test_accuracy']:.3f} after {args.epochs} epochs", file=sys.stderr)
    summary.update(seconds=round(time.perf_counter() - start, 2), script=Path(__file__).name)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
