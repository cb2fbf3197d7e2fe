"""Chapter 02 (train models): the code a reader copies must do what the chapter says it does.

Protected here: the hand-derived softmax gradient (finite differences), the checkpoint round trip
(weights and optimizer state, bit for bit), the loader's refusals (missing, truncated, foreign,
mismatched files), atomic writes (a failed save keeps the old file), resume equivalence on a tiny
problem, seeded reproducibility, early stopping, the learning curves' training loss (on a validation-sized
head of the training set), the retrain without a validation set (the same epochs as the
validated run), the learning-rate range test's stopping rule, and the calibration measures (ECE on
cases with known answers, temperature scaling that recovers a known temperature). The companion files are libraries with no
process of their own; the chapter itself is executed by the book build.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import NOTEBOOKS, load_module
from safetensors.torch import load_file, save_file

CHAPTER = NOTEBOOKS / "02-train-models"
snp = load_module(CHAPTER / "softmax_numpy.py")
tr = load_module(CHAPTER / "train.py")
cal = load_module(CHAPTER / "calibrate.py")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A tiny, fixed digits-like problem: 96 training and 32 validation images."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return tr.DigitsDataset(X[:96], y[:96]), tr.DigitsDataset(X[96:128], y[96:128])


def small_config(**changes) -> "tr.TrainConfig":
    # dropout and augmentation on, so that every random stream is exercised
    return replace(tr.TrainConfig(lr=3e-3, epochs=4, batch_size=32, dropout=0.3, augment=True,
                                  weight_decay=0.05, seed=3), **changes)


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the from-scratch algorithm -----------------------------------------------------------------------

def problem(seed=0, n=30, d=7, k=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(d, k)), rng.normal(size=k), rng.normal(size=(n, d)), rng.integers(0, k, n))


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_softmax_gradient_matches_finite_differences(l2):
    W, b, X, y = problem()
    assert snp.gradient_check(snp.loss_and_grad, W, b, X, y, l2=l2) < 1e-7


def test_gradient_check_catches_a_wrong_gradient():
    W, b, X, y = problem()

    def missing_l2_term(W, b, X, y, l2):
        loss, dW, db = snp.loss_and_grad(W, b, X, y, l2)
        return loss, dW - l2 * W, db

    assert snp.gradient_check(missing_l2_term, W, b, X, y, l2=0.5) > 1e-2


def test_loss_of_uniform_prediction_is_log_k():
    _, _, X, y = problem(k=4)
    loss, _, _ = snp.loss_and_grad(np.zeros((X.shape[1], 4)), np.zeros(4), X, y)
    assert loss == pytest.approx(np.log(4))


def test_fit_softmax_reaches_scikit_learns_objective():
    from sklearn.linear_model import LogisticRegression

    _, _, X, _ = problem(seed=1, n=200, d=5, k=3)
    y = np.argmax(X[:, :3] + 0.5 * np.random.default_rng(2).normal(size=(200, 3)), axis=1)
    C = 1.0
    l2 = 1.0 / (C * len(y))
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(X, y)
    best = snp.loss_and_grad(sk.coef_.T, sk.intercept_, X, y, l2)[0]
    W, b, losses = snp.fit_softmax(X, y, n_classes=3, l2=l2, lr=1.0, epochs=200, batch_size=32)
    assert best <= losses[-1] < best * 1.01
    assert (snp.predict(W, b, X) == sk.predict(X)).mean() >= 0.98


# --- checkpoints ------------------------------------------------------------------------------------

def trained(tiny, steps=3):
    """A model and an AdamW optimizer with non-trivial state."""
    tr.seed_everything(0)
    model = tr.DigitsCNN(dropout=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    train_set, _ = tiny
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(train_set.images[:32]), train_set.labels[:32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_restores_weights_optimizer_and_progress(tiny, tmp_path):
    model, optimizer = trained(tiny)
    progress = {"epoch": 3, "best_val_loss": 0.25, "history": {"val_loss": [0.5, 0.3, 0.25]}}
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, progress)

    model2 = tr.DigitsCNN(dropout=0.3)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1.0)  # different lr: must be restored
    assert tr.load_checkpoint(tmp_path / "ckpt.safetensors", model2, optimizer2) == progress
    assert tensors_equal(model.state_dict(), model2.state_dict())
    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for pid, values in saved["state"].items():
        assert tensors_equal(values, loaded["state"][pid])
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.safetensors"], "temporary file left behind"


def test_the_same_checkpoint_is_the_same_bytes(tiny, tmp_path):
    """Identical runs can be compared by file hash: the header must not vary between saves."""
    model, optimizer = trained(tiny)
    progress = {"epoch": 1, "b": 2, "a": [1, 2]}
    blobs = set()
    for i in range(5):
        tr.save_checkpoint(tmp_path / f"{i}.safetensors", model, optimizer, progress)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1


def test_loading_a_missing_file_says_so(tmp_path):
    with pytest.raises(tr.CheckpointError, match="no checkpoint"):
        tr.load_checkpoint(tmp_path / "nope.safetensors", tr.DigitsCNN())


def test_loading_a_truncated_file_raises_a_clear_error(tiny, tmp_path):
    model, _ = trained(tiny, steps=1)
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model)
    data = (tmp_path / "ckpt.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(tr.CheckpointError, match="not a readable safetensors file"):
        tr.load_checkpoint(tmp_path / "cut.safetensors", tr.DigitsCNN())


def test_a_flipped_bit_in_a_weight_is_refused_by_the_digest(tiny, tmp_path):
    model, optimizer = trained(tiny, steps=1)
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, {"epoch": 1})
    data = bytearray((tmp_path / "ckpt.safetensors").read_bytes())
    data[-3] ^= 0x01  # one mantissa bit of the last tensor in the file
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    assert not tensors_equal(load_file(tmp_path / "flipped.safetensors"), load_file(tmp_path / "ckpt.safetensors"))
    with pytest.raises(tr.CheckpointError, match=r"flipped\.safetensors is corrupt: SHA-256 digest mismatch"):
        tr.load_checkpoint(tmp_path / "flipped.safetensors", tr.DigitsCNN(), optimizer)


def test_edited_metadata_is_refused_by_the_digest(tiny, tmp_path):
    model, _ = trained(tiny, steps=1)
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model, state={"epoch": 1})
    data = (tmp_path / "ckpt.safetensors").read_bytes()
    assert data.count(b'\\"epoch\\": 1') == 1  # the progress, as JSON inside the header's JSON
    (tmp_path / "edited.safetensors").write_bytes(data.replace(b'\\"epoch\\": 1', b'\\"epoch\\": 7'))
    with pytest.raises(tr.CheckpointError, match="digest mismatch"):
        tr.load_checkpoint(tmp_path / "edited.safetensors", tr.DigitsCNN())


def test_a_checkpoint_without_a_digest_is_refused(tiny, tmp_path):
    model, _ = trained(tiny, steps=1)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    meta = {"format": tr.CHECKPOINT_FORMAT, "state": {}}
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata={tr.METADATA_KEY: json.dumps(meta)})
    with pytest.raises(tr.CheckpointError, match="carries no SHA-256 digest"):
        tr.load_checkpoint(tmp_path / "bare.safetensors", tr.DigitsCNN())


def test_a_zero_length_checkpoint_says_it_is_empty(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(tr.CheckpointError, match=r"empty\.safetensors is empty \(0 bytes\)"):
        tr.load_checkpoint(tmp_path / "empty.safetensors", tr.DigitsCNN())


def test_loading_a_foreign_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(tr.CheckpointError, match="format"):
        tr.load_checkpoint(tmp_path / "other.safetensors", tr.DigitsCNN())


def test_loading_into_a_different_architecture_names_the_mismatch(tiny, tmp_path):
    model, _ = trained(tiny, steps=1)
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model)
    with pytest.raises(tr.CheckpointError, match=r"head\.5\.weight: file \(10, 64\), model \(7, 64\)"):
        tr.load_checkpoint(tmp_path / "ckpt.safetensors", tr.DigitsCNN(n_classes=7))


def test_weights_only_checkpoint_cannot_restore_an_optimizer(tiny, tmp_path):
    model, optimizer = trained(tiny, steps=1)
    tr.save_checkpoint(tmp_path / "ckpt.safetensors", model)
    with pytest.raises(tr.CheckpointError, match="no optimizer state"):
        tr.load_checkpoint(tmp_path / "ckpt.safetensors", tr.DigitsCNN(), optimizer)


def test_a_failed_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    model, _ = trained(tiny, steps=1)
    tr.save_checkpoint(path, model)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    newer, _ = trained(tiny, steps=2)
    monkeypatch.setattr(tr.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(path, newer)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path], "temporary file left behind"


# --- training ------------------------------------------------------------------------------------------

def test_resumed_training_equals_uninterrupted_training(tiny, tmp_path):
    train_set, val_set = tiny
    cfg = small_config()
    straight, s_state = tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "a")
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "b", stop_after=2)
    assert load_file(tmp_path / "b" / "last.safetensors").keys() == load_file(tmp_path / "a" / "last.safetensors").keys()
    resumed, r_state = tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "b", resume=True)
    assert tensors_equal(load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors"))
    assert tensors_equal(straight.state_dict(), resumed.state_dict())
    assert s_state == r_state


def test_resume_without_optimizer_state_would_be_caught(tiny, tmp_path):
    """The equivalence test above is sensitive: dropping the optimizer state changes the result."""
    train_set, val_set = tiny
    cfg = small_config()
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "a")
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "b", stop_after=2)
    model = tr.DigitsCNN(cfg.dropout)
    progress = tr.load_checkpoint(tmp_path / "b" / "last.safetensors", model)
    fresh = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr.save_checkpoint(tmp_path / "b" / "last.safetensors", model, fresh, progress)
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path / "b", resume=True)
    assert not tensors_equal(load_file(tmp_path / "a" / "last.safetensors"),
                             load_file(tmp_path / "b" / "last.safetensors"))


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny):
    train_set, val_set = tiny
    cfg = small_config(epochs=2)
    a, _ = tr.fit(cfg, train_set, val_set)
    b, _ = tr.fit(cfg, train_set, val_set)
    c, _ = tr.fit(replace(cfg, seed=cfg.seed + 1), train_set, val_set)
    assert tensors_equal(a.state_dict(), b.state_dict())
    assert not tensors_equal(a.state_dict(), c.state_dict())


@pytest.mark.parametrize("on_disk", [True, False])
def test_early_stopping_stops_after_patience_and_returns_the_best_weights(tiny, tmp_path, monkeypatch,
                                                                         on_disk):
    """The validation losses are scripted, so when training stops and which epoch wins do not depend
    on this machine's arithmetic; the weights still change every epoch, so restoring the wrong
    epoch's weights is caught."""
    train_set, val_set = tiny
    script = [0.9, 0.5, 0.7, 0.4, 0.6, 0.45, 0.8, 0.1]  # best at epoch index 3; 0.1 must never be seen
    real_evaluate, weights = tr.evaluate, []

    def scripted(model, dataset, device):
        loss, acc = real_evaluate(model, dataset, device)
        if dataset is not val_set:
            return loss, acc
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return script[len(weights) - 1], acc

    monkeypatch.setattr(tr, "evaluate", scripted)
    cfg = small_config(epochs=len(script), patience=3)
    model, state = tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path if on_disk else None)
    assert state["stopped_early"] and state["best_epoch"] == 3 and state["best_val_loss"] == 0.4
    assert state["epoch"] == 3 + 1 + cfg.patience == len(weights) < cfg.epochs
    assert state["history"]["val_loss"] == script[:state["epoch"]]
    assert tensors_equal(model.state_dict(), weights[3])
    assert not tensors_equal(model.state_dict(), weights[-1]), "the last epoch's weights were kept"
    if on_disk:
        best = tr.DigitsCNN()
        tr.load_checkpoint(tmp_path / "best.safetensors", best)
        assert tensors_equal(best.state_dict(), weights[3])


def test_the_returned_model_scores_the_recorded_best_validation_loss(tiny):
    train_set, val_set = tiny
    cfg = small_config(epochs=5, augment=False, dropout=0.0)
    model, state = tr.fit(cfg, train_set, val_set)
    losses = state["history"]["val_loss"]
    assert state["best_val_loss"] == min(losses) and state["best_epoch"] == losses.index(min(losses))
    assert tr.evaluate(model, val_set, "cpu")[0] == state["best_val_loss"]


def test_lr_range_test_stops_on_the_smoothed_loss_not_on_one_batch(tiny):
    train_set, _ = tiny
    lrs, losses, smooth = tr.lr_range_test(small_config(dropout=0.0, augment=False), train_set)
    assert len(lrs) == len(losses) == len(smooth) and lrs == sorted(lrs)
    alpha, average = 0.1, 0.0
    for i, loss in enumerate(losses):  # the moving average is the bias-corrected one pandas computes
        average = (1 - alpha) * average + alpha * loss
        assert smooth[i] == pytest.approx(average / (1 - (1 - alpha) ** (i + 1)))
    assert all(s <= 4 * min(smooth[: i + 1]) for i, s in enumerate(smooth[:-1]))  # no early stop
    assert len(lrs) < 120 and not smooth[-1] <= 4 * min(smooth)  # diverged (or nan) before lr 3


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    images = torch.zeros(200, 1, 8, 8)
    images[:, 0, 3:5, 3:5] = torch.rand(200, 2, 2) + 0.1  # ink away from the border
    shifted = tr.random_shift(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.allclose(shifted.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))  # nothing falls off
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    offsets = set()
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(shifted[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches, f"image {i} is not a shifted copy"
        offsets.add(matches[0])
    assert len(offsets) == 9, "all nine shifts should occur in 200 draws"


def test_refit_replays_the_validated_runs_epochs_without_a_validation_set(tiny, tmp_path):
    """The retrain must be the run that was validated, minus the validation: same seeded epochs."""
    train_set, val_set = tiny
    cfg = small_config(epochs=3)
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path)
    last = {k.removeprefix("model/"): v for k, v in load_file(tmp_path / "last.safetensors").items()
            if k.startswith("model/")}
    refitted = tr.refit(cfg, train_set)
    assert tensors_equal(refitted.state_dict(), last)
    assert not tensors_equal(tr.refit(replace(cfg, epochs=2), train_set).state_dict(), last)


# --- calibration -----------------------------------------------------------------------------------

def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    probs = np.full((8, 2), 0.25)
    probs[:, 0] = 0.75                       # every prediction: class 0 with confidence 0.75
    labels = np.array([0, 0, 0, 1] * 2)      # right three times in four
    ece, table = cal.expected_calibration_error(probs, labels)
    assert ece == pytest.approx(0.0) and table["count"].tolist() == [8]
    ece, table = cal.expected_calibration_error(probs, np.array([0, 1] * 4))  # right half the time
    assert ece == pytest.approx(0.25) and table["accuracy"].tolist() == [0.5]


def test_ece_puts_full_confidence_in_the_last_bin_and_weights_bins_by_count():
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])          # top bin: confidence 1, accuracy 0.5; bin 5: 0.55 vs 1
    ece, table = cal.expected_calibration_error(probs, labels)
    assert table["lower"].tolist() == [0.5, 0.9]
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.5)
    with pytest.raises(ValueError, match="need an"):
        cal.expected_calibration_error(probs, labels[:3])


def test_temperature_scaling_recovers_a_known_temperature_and_never_hurts():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=g).squeeze(1)
    temperature, nll = cal.fit_temperature(logits, labels)  # the network is overconfident by 2x
    assert 1.7 < temperature < 2.3
    assert nll <= torch.nn.functional.cross_entropy(logits, labels).item()
    calibrated = logits / 2.0
    assert cal.fit_temperature(calibrated, labels)[0] == pytest.approx(1.0, abs=0.15)


def test_the_learning_curves_training_loss_is_measured_on_a_validation_sized_head(tiny, tmp_path):
    """The chapter says the training loss is measured on as many training images as the validation
    set holds, the first ones; the weights after the epoch must reproduce it exactly."""
    train_set, val_set = tiny
    cfg = small_config(epochs=1)
    tr.fit(cfg, train_set, val_set, checkpoint_dir=tmp_path)
    model = tr.DigitsCNN(cfg.dropout)
    recorded = tr.load_checkpoint(tmp_path / "last.safetensors", model)["history"]["train_loss"][0]
    head = train_set.head(len(val_set))
    assert len(head) == len(val_set) and torch.equal(head.images, train_set.images[:len(val_set)])
    assert recorded == tr.evaluate(model, head, "cpu")[0]
    assert recorded != tr.evaluate(model, train_set, "cpu")[0]
