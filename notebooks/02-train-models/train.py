"""A small CNN for the 8x8 digits, its training loop, and checkpoints that survive crashes.

This is a file and not a chapter cell for two reasons: the tests
(tests/test_02_train_models.py) check the checkpoint round trip, crash safety and resume
equivalence on a tiny problem without running the chapter, and the chapter shows each
function with ``literalinclude`` instead of burying 300 lines in cells. It is a library,
not a script: nothing runs at import. Used from the chapter::

    import train as tr
    model, state = tr.fit(tr.TrainConfig(), train_set, val_set, device, checkpoint_dir=...)

Every random choice in training (initial weights, batch order, dropout masks,
augmentation shifts) comes from seeds derived from ``TrainConfig.seed`` and the epoch
number, so an epoch can be replayed from a checkpoint without saving generator state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader, Dataset

CHECKPOINT_FORMAT = "gradient-rage/train-models/v2"  # v2: with a SHA-256 digest
METADATA_KEY = "gradient-rage"


class DigitsDataset(Dataset):
    """8x8 digit images as (1, 8, 8) float tensors scaled to [0, 1], with integer labels."""

    def __init__(self, X: np.ndarray, y: np.ndarray, scale: float = 16.0):
        pixels = np.asarray(X, dtype=np.float32) / scale
        self.images = torch.as_tensor(pixels).reshape(-1, 1, 8, 8)
        self.labels = torch.as_tensor(np.asarray(y), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def head(self, n: int) -> "DigitsDataset":
        """The first ``n`` examples as a dataset of their own (no copy)."""
        part = DigitsDataset.__new__(DigitsDataset)
        part.images, part.labels = self.images[:n], self.labels[:n]
        return part


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, then a two-layer head: 38k parameters."""

    def __init__(self, dropout: float = 0.0, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(64, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    dropout: float = 0.0
    augment: bool = False        # random shifts of up to one pixel
    epochs: int = 40
    batch_size: int = 64
    patience: int | None = None  # early stopping: epochs without a better validation loss
    seed: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) in one place."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 10_000 + epoch


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1):
    """Shift each image by up to ``max_shift`` pixels each way, filling with zeros."""
    size = x.shape[-1]
    padded = nn.functional.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            rows = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[rows] = padded[rows, :, dy:dy + size, dx:dx + size]
    return out


def train_one_epoch(model, loader, optimizer, device, augment_with=None) -> float:
    """One pass over ``loader``; returns the mean mini-batch loss.

    ``augment_with`` is a torch.Generator for the random shifts, or None for no shifts.
    """
    model.train()
    total, count = 0.0, 0
    for images, labels in loader:
        if augment_with is not None:
            images = random_shift(images, augment_with)
        images, labels = images.to(device), labels.to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / count


@torch.no_grad()
def predict_logits(model, dataset, device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    return torch.cat([model(images.to(device)).cpu() for images, _ in loader])


def evaluate(model, dataset, device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``dataset`` in eval mode (no dropout, no shifts)."""
    logits = predict_logits(model, dataset, device)
    loss = nn.functional.cross_entropy(logits, dataset.labels).item()
    return loss, (logits.argmax(1) == dataset.labels).float().mean().item()


def fit(cfg: TrainConfig, train_set, val_set, device="cpu", checkpoint_dir=None,
        resume: bool = False, stop_after: int | None = None):
    """Train a DigitsCNN; return ``(model, state)`` with the best-validation weights loaded.

    With ``checkpoint_dir``, every epoch writes ``last.safetensors`` (weights, optimizer,
    progress) and every new best validation loss writes ``best.safetensors``, both
    atomically; ``resume=True`` continues from ``last.safetensors``. ``stop_after`` ends
    the run after that many epochs, as a crash would (the weights are then the last). The
    training loss of the learning curves is measured on as many training images as the
    validation set holds (the first ones; the split is shuffled), at less than half the cost.
    """
    model, optimizer = seeded_start(cfg, device)
    state = {"config": asdict(cfg), "epoch": 0, "best_val_loss": None, "best_epoch": None,
             "bad_epochs": 0, "stopped_early": False,
             "history": {"train_loss": [], "val_loss": [], "val_acc": [], "batch_loss": []}}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is not None and (ckpt / "last.safetensors").exists():
        state = load_checkpoint(ckpt / "last.safetensors", model, optimizer)
    best_weights, train_probe = None, train_set.head(len(val_set))
    for epoch in range(state["epoch"], cfg.epochs):
        if state["stopped_early"] or (stop_after is not None and epoch >= stop_after):
            break
        batch_loss = seeded_epoch(cfg, model, optimizer, train_set, epoch, device)
        train_loss, _ = evaluate(model, train_probe, device)
        val_loss, val_acc = evaluate(model, val_set, device)
        _record(state, batch_loss, train_loss, val_loss, val_acc, epoch, cfg.patience)
        if state["best_epoch"] == epoch:
            best_weights = _snapshot(model, ckpt)
        if ckpt is not None:
            save_checkpoint(ckpt / "last.safetensors", model, optimizer, state)
    if stop_after is None or state["stopped_early"] or state["epoch"] >= cfg.epochs:
        _restore_best(model, best_weights, ckpt)
    return model, state


def seeded_start(cfg: TrainConfig, device):
    """Seed every generator, then build the network and its AdamW: the start of every run."""
    seed_everything(cfg.seed)
    model = DigitsCNN(cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    return model, optimizer


def seeded_epoch(cfg: TrainConfig, model, optimizer, train_set, epoch: int, device) -> float:
    """One epoch whose batch order, shifts and dropout masks come from the seed and the epoch."""
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))  # batch order, shifts
    torch.manual_seed(epoch_seed(cfg.seed, epoch))                  # dropout masks
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=g)
    return train_one_epoch(model, loader, optimizer, device, g if cfg.augment else None)


def refit(cfg: TrainConfig, train_set, device="cpu"):
    """Train for exactly ``cfg.epochs`` with no validation set and return the last weights.

    The retrain on training plus validation data once every decision is made: the epoch
    count comes from the early-stopped runs, because nothing is left to stop on.
    """
    model, optimizer = seeded_start(cfg, device)
    for epoch in range(cfg.epochs):
        seeded_epoch(cfg, model, optimizer, train_set, epoch, device)
    return model


def _record(state, batch_loss, train_loss, val_loss, val_acc, epoch, patience) -> None:
    h = state["history"]
    h["batch_loss"].append(batch_loss)
    h["train_loss"].append(train_loss)
    h["val_loss"].append(val_loss)
    h["val_acc"].append(val_acc)
    state["epoch"] = epoch + 1
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
        state["stopped_early"] = patience is not None and state["bad_epochs"] >= patience


def _snapshot(model, ckpt: Path | None):
    """Keep the best weights: on disk with a checkpoint folder, else a copy in memory."""
    if ckpt is not None:
        save_checkpoint(ckpt / "best.safetensors", model)
        return None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore_best(model, best_weights, ckpt: Path | None) -> None:
    if best_weights is not None:
        model.load_state_dict(best_weights)
    elif ckpt is not None and (ckpt / "best.safetensors").exists():
        load_checkpoint(ckpt / "best.safetensors", model)


# --- checkpoints ---------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, in another format, or for another model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``; a crash leaves the old file or the new one, never half.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the
    temporary file is renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(path, model, optimizer=None, state: dict | None = None) -> None:
    """Save weights (and optionally optimizer state and progress) atomically, as safetensors.

    safetensors holds only tensors and string metadata: loading it cannot run code, unlike
    a pickle. Optimizer tensors are stored as ``optim/<param>/<name>``; hyperparameters and
    progress go into one metadata entry as JSON (safetensors writes several entries in a
    random order, and one entry keeps identical checkpoints byte for byte identical).
    """
    tensors = {f"model/{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "state": state or {}}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for pid, values in opt["state"].items():
            for name, value in values.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state {name!r} is not a tensor")
                tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous()
        meta["param_groups"] = opt["param_groups"]
    meta["sha256"] = content_digest(tensors, meta)  # safetensors itself checks nothing
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=metadata))


def content_digest(tensors: dict, meta: dict) -> str:
    """SHA-256 over the metadata (as sorted JSON) and every tensor's name, dtype, shape, bytes.

    safetensors stores no checksum: one flipped bit in the data loads as a different weight.
    This digest, stored in the metadata and recomputed on load, turns that into an error.
    """
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_checkpoint(path, model, optimizer=None) -> dict:
    """Load weights (and optimizer state when given) from ``path``; return the progress.

    Raises CheckpointError with the reason when the file is missing, truncated or corrupt
    (its SHA-256 digest does not match its contents), in another format, or holds weights whose names or shapes do not match ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write never got its data")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file "
                              f"(truncated or corrupt?): {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}")
    stored = meta.pop("sha256", None)
    if stored is None:
        raise CheckpointError(f"{path} carries no SHA-256 digest; refusing to trust it")
    if (actual := content_digest(tensors, meta)) != stored:
        raise CheckpointError(f"{path} is corrupt: SHA-256 digest mismatch (stored "
                              f"{stored[:12]}..., contents {actual[:12]}...); the file "
                              "changed after it was written")
    weights = {k.removeprefix("model/"): v for k, v in tensors.items()
               if k.startswith("model/")}
    _check_matches(path, weights, model.state_dict())
    model.load_state_dict(weights)
    if optimizer is not None:
        if "param_groups" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state (weights only)")
        optimizer.load_state_dict(_optimizer_state(tensors, meta["param_groups"]))
    return meta["state"]


def _check_matches(path, weights: dict, expected: dict) -> None:
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = [f"{k}: file {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
             for k in sorted(expected.keys() & weights.keys())
             if weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not fit this model: missing {missing}, "
                              f"unexpected {unexpected}, shape mismatches {wrong}")


def _optimizer_state(tensors: dict, param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for group in param_groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": param_groups}


# --- the recipe's checks ---------------------------------------------------------------

def lr_range_test(cfg: TrainConfig, train_set, device="cpu", lr_min: float = 1e-5,
                  lr_max: float = 3.0, steps: int = 120, smoothing: float = 0.1):
    """Train a fresh model for up to ``steps`` mini-batches while the learning rate grows
    exponentially from ``lr_min`` to ``lr_max``; return the rates, the batch losses and
    their moving average (exponential, weight ``smoothing`` on the newest batch).
    Stops once the moving average has clearly diverged (four times its lowest value): one
    unlucky batch is not a cliff, and stopping on it ends the test while the loss still falls.
    """
    seed_everything(cfg.seed)
    model = DigitsCNN(cfg.dropout).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_min,
                                  weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, 0))
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=g,
                        drop_last=True)
    lrs, losses, smooth, batches, average = [], [], [], iter(loader), 0.0
    for step in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        loss = nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lrs.append(lr)
        losses.append(loss.item())
        average = (1 - smoothing) * average + smoothing * losses[-1]
        smooth.append(average / (1 - (1 - smoothing) ** (step + 1)))  # bias-corrected
        if not math.isfinite(losses[-1]) or (step > 10 and smooth[-1] > 4 * min(smooth)):
            break
    return lrs, losses, smooth


def overfit_one_batch(model, images, labels, steps: int = 150, lr: float = 3e-3):
    """Train on one fixed batch only; return the loss after every step.

    A model and loss that can learn at all drive this loss to about zero.
    """
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
