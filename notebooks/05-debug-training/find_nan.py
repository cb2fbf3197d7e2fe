"""Open the debugger at the first NaN gradient of chapter 05's quick-fix loss (softmax in the model,
``log`` in the loss), in the training loop's own frame.

Anomaly mode names the operation whose backward made the NaN; a debugger opened at that moment
shows the rest: the step, the batch, the model's outputs and the loss, all still alive. The loop is
the chapter's (the same data, split, model, seed, learning rate and one torch thread), so it stops
at the step the chapter's anomaly hunt reports. The chapter drives it with pdb commands on stdin
(``debug_tools.pdb_session``); run it yourself from this folder and type them::

    python find_nan.py --seed 0
    (Pdb) p step, loss.item()
    (Pdb) p int((probs == 0).sum())
    (Pdb) c

Exit status 1 when it stopped at a NaN, 0 when none came in ``--steps`` steps.
``PYTHONBREAKPOINT=0`` runs the same loop without stopping. CPU only: the chapter's NaN hunt is.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stop in pdb at the first NaN gradient of the quick-fix loss.")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam's learning rate (the chapter's 0.03)")
    parser.add_argument("--steps", type=int, default=200, help="give up after this many steps")
    parser.add_argument("--seed", type=int, default=0, help="the book's seed (the chapter passes its own)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import itertools

    import torch

    import train_broken as broken  # this folder: the model that ends in a softmax
    import train_fixed as fixed  # this folder: the fixed loader, split and scaling

    torch.set_num_threads(1)  # as the chapter: the same arithmetic, so the same step
    X, y = fixed.load_dataset(fixed.export_digits())  # the digits, exported on first use
    X_train, X_test, y_train, _ = fixed.split(X, y, args.seed)
    Z_train, _ = fixed.prepare(X_train, X_test)
    torch.manual_seed(args.seed)
    model = broken.make_model(64, 10, 128, 0.3)
    loader = fixed.make_loader(Z_train, y_train, 64, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    with torch.autograd.detect_anomaly():
        for step, (xb, yb) in enumerate(itertools.islice(batches, args.steps), 1):
            optimizer.zero_grad()
            probs = model(xb)
            loss = torch.nn.functional.nll_loss(torch.log(probs), yb)
            try:
                loss.backward()
            except RuntimeError:  # anomaly mode: a backward function returned NaN
                breakpoint()  # the debugger opens here, with this step's batch, outputs and loss in reach
                return 1
            optimizer.step()
    print(f"no NaN gradient in {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
