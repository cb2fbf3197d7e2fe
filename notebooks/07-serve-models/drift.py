"""Input drift: the population stability index (PSI) of every feature, a window of live rows against
the rows the model was built on.

Why a file and not a cell: the chapter and tests/test_07_serve_models.py use the same functions, and
a monitor that pages someone deserves tests of its own (a constant feature, an empty bin, a shift the
index must see). Nothing here runs a process; import it::

    from drift import psi_per_feature, drift_alerts
    psi = psi_per_feature(reference_rows, live_rows)      # one PSI per column
    alerts = drift_alerts(psi, threshold=0.25)            # the columns past the threshold

``python drift.py --help`` describes a self-check on the digits: a clean stream against a stream
shifted by one pixel, printed as one JSON line.
"""

import argparse
import json

#: Bin edges for the digits' pixel counts 0..16: zero on its own (most pixels), then four bands.
DIGIT_BINS = (0, 1, 5, 9, 13, 17)
#: The usual reading of PSI: below 0.1 no change, 0.1 to 0.25 a moderate one, above 0.25 a real shift.
ALERT_PSI = 0.25


def psi_per_feature(reference, current, bins=DIGIT_BINS, floor: float = 1e-4):
    """PSI of each column: sum over bins of (current share - reference share) * ln(current / reference).
    Empty bins count as ``floor`` so that a bin seen on one side only adds a large but finite term."""
    import numpy as np

    reference, current = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if reference.ndim != 2 or current.ndim != 2 or reference.shape[1] != current.shape[1]:
        raise ValueError(f"need two tables with the same columns, got {reference.shape} and {current.shape}")
    if len(reference) == 0 or len(current) == 0:
        raise ValueError("need at least one row on each side")
    out = np.empty(reference.shape[1])
    for j in range(reference.shape[1]):
        ref = np.histogram(reference[:, j], bins=bins)[0] / len(reference)
        cur = np.histogram(current[:, j], bins=bins)[0] / len(current)
        ref, cur = np.maximum(ref, floor), np.maximum(cur, floor)
        out[j] = float(np.sum((cur - ref) * np.log(cur / ref)))
    return out


def drift_alerts(psi, threshold: float = ALERT_PSI) -> list[int]:
    """The columns whose PSI passes ``threshold``: an alert names what moved, not just that something did."""
    return [int(j) for j in range(len(psi)) if psi[j] > threshold]


def shift_right(rows, pixels: int = 1, side: int = 8):
    """Each 8x8 digit moved ``pixels`` to the right, zeros coming in on the left: a misaligned scanner."""
    import numpy as np

    images = np.asarray(rows).reshape(-1, side, side)
    moved = np.zeros_like(images)
    moved[:, :, pixels:] = images[:, :, : side - pixels]
    return moved.reshape(len(images), side * side)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PSI drift self-check on the digits: clean against shifted.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import numpy as np
    from sklearn.datasets import load_digits

    x = load_digits().data
    order = np.random.default_rng(args.seed).permutation(len(x))
    reference, stream = x[order[: len(x) // 2]], x[order[len(x) // 2 :]]
    clean, shifted = psi_per_feature(reference, stream), psi_per_feature(reference, shift_right(stream))
    print(json.dumps({"clean_max_psi": float(clean.max()), "shifted_max_psi": float(shifted.max()),
                      "clean_alerts": drift_alerts(clean), "shifted_alerts": len(drift_alerts(shifted))}))


if __name__ == "__main__":
    main()
