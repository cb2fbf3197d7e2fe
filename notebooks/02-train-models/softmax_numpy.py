"""Softmax (multinomial logistic) regression in NumPy, with hand-derived gradients.

This is a file and not a chapter cell so that the tests can check the gradient against
finite differences on their own (tests/test_02_train_models.py), and so that the chapter
can show each function with ``literalinclude``. It is a library, not a script: nothing
runs at import.

The model maps a row ``x`` (d features) to class probabilities ``softmax(x @ W + b)``
with ``W`` of shape (d, k) and ``b`` of shape (k,). The objective is the mean
cross-entropy plus an L2 penalty on ``W`` (not on ``b``)::

    J(W, b) = mean_i[-log p_i,y_i] + (l2 / 2) * ||W||^2

which is exactly the objective scikit-learn's ``LogisticRegression(C=C)`` minimises when
``l2 = 1 / (C * n_samples)``. Used from the chapter::

    from softmax_numpy import fit_softmax, loss_and_grad, gradient_check
"""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax; subtracting the row maximum keeps ``exp`` from overflowing."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_grad(W, b, X, y, l2: float = 0.0):
    """Objective J and its gradients dJ/dW, dJ/db for rows ``X`` (n, d), labels ``y`` (n,).

    With p = softmax(XW + b) and Y the one-hot labels, dJ/dlogits = (p - Y) / n, and the
    chain rule through XW + b gives dW = X^T (p - Y) / n + l2 W, db = sum_i (p - Y) / n.
    """
    n = X.shape[0]
    p = softmax(X @ W + b)
    loss = -np.log(p[np.arange(n), y] + 1e-300).mean() + 0.5 * l2 * np.sum(W * W)
    dlogits = p.copy()
    dlogits[np.arange(n), y] -= 1.0
    dlogits /= n
    return loss, X.T @ dlogits + l2 * W, dlogits.sum(axis=0)


def numerical_grad(f, theta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central differences of the scalar ``f()`` in each entry of ``theta`` (restored)."""
    grad = np.zeros_like(theta)
    for i in np.ndindex(theta.shape):
        old = theta[i]
        theta[i] = old + eps
        up = f()
        theta[i] = old - eps
        down = f()
        theta[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a| + |b|): scale-free, so one threshold fits any parameter."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-12))


def gradient_check(grad_fn, W, b, X, y, l2: float = 0.0, eps: float = 1e-5) -> float:
    """Largest relative error between ``grad_fn``'s gradients and finite differences.

    ``grad_fn`` has the signature of :func:`loss_and_grad`. Run it in float64 on a few
    rows: a correct gradient gives ~1e-9, a wrong one ~1e-1.
    """
    W, b = W.astype(np.float64).copy(), b.astype(np.float64).copy()
    _, dW, db = grad_fn(W, b, X, y, l2)
    num_W = numerical_grad(lambda: loss_and_grad(W, b, X, y, l2)[0], W, eps)
    num_b = numerical_grad(lambda: loss_and_grad(W, b, X, y, l2)[0], b, eps)
    return max(relative_error(dW, num_W), relative_error(db, num_b))


def fit_softmax(X, y, n_classes: int, l2: float = 0.0, lr: float = 0.5,
                epochs: int = 100, batch_size: int = 64, seed: int = 0):
    """Mini-batch gradient descent from zero weights; returns ``(W, b, losses)``.

    Each epoch visits the rows in a fresh seeded order. The step decays as
    lr / sqrt(epoch + 1), so the noisy mini-batch steps settle near the optimum instead of
    rattling around it. ``losses`` holds the full-data objective after each epoch.
    """
    rng = np.random.default_rng(seed)
    n, d = X.shape
    W, b = np.zeros((d, n_classes)), np.zeros(n_classes)
    losses = []
    for epoch in range(epochs):
        step = lr / np.sqrt(epoch + 1)
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            _, dW, db = loss_and_grad(W, b, X[rows], y[rows], l2)
            W -= step * dW
            b -= step * db
        losses.append(float(loss_and_grad(W, b, X, y, l2)[0]))
    return W, b, losses


def predict_proba(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
    return softmax(X @ W + b)


def predict(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
    return predict_proba(W, b, X).argmax(axis=1)
