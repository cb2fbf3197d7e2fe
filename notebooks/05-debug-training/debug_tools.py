"""The instruments of chapter 05 (Debug training): each function is one debugging technique.

Change one thing at a time (``with_fixes`` grafts chosen fixed functions into the broken script),
trace a run step by step (``trace_run``), check labels along the file order
(``label_agreement``), evaluate twice (``evaluation_spread``), predict one example at a time
(``single_example_accuracy``), hunt the first NaN (``first_nan``), profile an epoch
(``torch_profile``, ``python_profile``) and diff the two scripts (``script_diff``).

This is a file because these functions are longer than a notebook cell and the tests exercise
them. Nothing runs at import. From the chapter's folder::

    import debug_tools as dt
    hybrid = dt.with_fixes(["load_dataset"])  # the broken script with one function fixed
    trace = dt.trace_run(hybrid, epochs=30)
"""

from __future__ import annotations

import contextlib
import cProfile
import difflib
import importlib.util
import io
import itertools
import math
import pstats
import sys
import types
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
BROKEN = HERE / "train_broken.py"
FIXED = HERE / "train_fixed.py"
#: The functions that differ between the scripts, in the order the chapter fixes them.
FIXABLE = ("load_dataset", "make_model", "train_step", "train_one_epoch", "evaluate", "prepare", "make_loader")
_names = itertools.count()


def load_script(path: Path, name: str | None = None) -> types.ModuleType:
    """Import a script by path under a fresh module name (each call gives an independent module)."""
    path = Path(path)
    name = name or f"gr05_{path.stem}_{next(_names)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@cache
def _fixed_script(path: Path) -> types.ModuleType:
    return load_script(path, f"gr05_{path.stem}_source")


def graft(function: types.FunctionType, module: types.ModuleType) -> types.FunctionType:
    """``function``'s code with its global names looked up in ``module``.

    A plain ``setattr`` would keep the fixed function's globals, so a fixed ``train_one_epoch``
    would quietly call the fixed ``train_step`` too and two fixes would land at once. Names that
    only the fixed script defines (a new class) are copied into ``module`` first.
    """
    for name in function.__code__.co_names:
        if name in function.__globals__ and name not in vars(module):
            setattr(module, name, function.__globals__[name])
    grafted = types.FunctionType(function.__code__, vars(module), function.__name__,
                                 function.__defaults__, function.__closure__)
    grafted.__kwdefaults__, grafted.__doc__ = function.__kwdefaults__, function.__doc__
    return grafted


def with_fixes(fixes, broken: Path = BROKEN, fixed: Path = FIXED) -> types.ModuleType:
    """A fresh copy of the broken script in which the functions named in ``fixes`` are fixed."""
    unknown = sorted(set(fixes) - set(FIXABLE))
    if unknown:
        raise ValueError(f"no fix for {unknown}; the fixable functions are {FIXABLE}")
    module, source = load_script(broken), _fixed_script(Path(fixed))
    for name in fixes:
        setattr(module, name, graft(getattr(source, name), module))
    module.FIXES = tuple(fixes)
    return module


@dataclass
class Trace:
    """What one training run did: the module that ran, its summary, trained model, raw data split
    (X_train, X_test, y_train, y_test), per-step log and whatever it printed to stderr."""

    module: types.ModuleType
    summary: dict
    model: nn.Module
    data: tuple
    steps: pd.DataFrame
    log: str

    @property
    def accuracy(self) -> float:
        return self.summary["test_accuracy"]


def trace_run(module: types.ModuleType, **run_kwargs) -> Trace:
    """Run ``module.run`` while recording, at every optimiser step, the loss, the learning rate and
    the norm of the gradient the optimiser used for each linear layer's weights."""
    steps, inner = [], module.train_step

    def traced_step(model, xb, yb, optimizer):
        lr = optimizer.param_groups[0]["lr"]
        loss = inner(model, xb, yb, optimizer)
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        norms = {f"layer {i}": float(m.weight.grad.norm()) for i, m in enumerate(layers, 1)}
        steps.append({"step": len(steps) + 1, "loss": loss, "lr": lr, **norms})
        return loss

    module.train_step, log = traced_step, io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            summary, model, data = module.run(**run_kwargs)
    finally:
        module.train_step = inner
    return Trace(module, summary, model, data, pd.DataFrame(steps), log.getvalue())


def label_agreement(X: np.ndarray, y: np.ndarray, block: int = 100, seed: int = 0) -> pd.DataFrame:
    """Cross-validated agreement between a linear model's predictions and the labels, per block of
    rows in file order. Correct labels agree about as often everywhere; a block of labels that
    belong to other images drops to chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = cross_val_predict(model, X, y, cv=KFold(5, shuffle=True, random_state=seed))
    agree = predicted == y
    starts = range(0, len(y), block)
    return pd.DataFrame({"first_row": list(starts), "agreement": [float(agree[s:s + block].mean()) for s in starts]})


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluation_spread(module: types.ModuleType, model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                      repeats: int = 20) -> list[float]:
    """The module's ``evaluate`` called ``repeats`` times on the same model and data, starting from
    the state a model is in after a training epoch."""
    model.train()
    return [module.evaluate(model, X, y) for _ in range(repeats)]


def single_example_accuracy(module: types.ModuleType, model: nn.Module, X_train: np.ndarray,
                            X_test: np.ndarray, y_test: np.ndarray) -> tuple[float, float]:
    """Test accuracy when the test set is prepared as one batch, and when each example is
    prepared alone, as a server sees it."""
    device = _device_of(model)
    y = torch.as_tensor(y_test, device=device)
    _, batch = module.prepare(X_train, X_test)
    alone = np.concatenate([module.prepare(X_train, X_test[i:i + 1])[1] for i in range(len(X_test))])
    scores = [module.evaluate(model, torch.as_tensor(Z, dtype=torch.float32, device=device), y)
              for Z in (batch, alone)]
    return scores[0], scores[1]


def train_losses(model: nn.Module, loss_fn, loader, lr: float, steps: int) -> list[float]:
    """A plain loop (zero_grad, loss, backward, Adam step) over ``loader`` for ``steps`` steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device, losses = _device_of(model), []
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    for xb, yb in itertools.islice(batches, steps):
        optimizer.zero_grad()
        loss = loss_fn(model(xb.to(device)), yb.to(device))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@dataclass
class NanReport:
    """Where anomaly detection stopped a run: the step, the loss of that step, the backward
    function that produced a NaN, the forward line that created it, and how many model outputs
    were exactly zero in that step."""

    step: int
    loss: float
    error: str
    forward_line: str
    exact_zeros: int


def first_nan(model: nn.Module, loss_fn, loader, lr: float, max_steps: int) -> NanReport | None:
    """The plain loop of ``train_losses`` under ``torch.autograd.detect_anomaly``: stops at the
    first backward function that returns a NaN and reports the forward call that caused it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = _device_of(model)
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.detect_anomaly():
            for step, (xb, yb) in enumerate(itertools.islice(batches, max_steps), 1):
                optimizer.zero_grad()
                output = model(xb.to(device))
                loss = loss_fn(output, yb.to(device))
                try:
                    loss.backward()
                except RuntimeError as error:
                    return NanReport(step, loss.item(), str(error), _forward_line(caught),
                                     int((output == 0).sum()))
                optimizer.step()
    return None


def pdb_session(script: Path, args: list[str], commands: list[str], timeout: float = 120.0) -> dict:
    """Run ``script`` as its own Python process and answer its debugger's prompts with ``commands``
    on stdin: a real pdb session, scripted. Returns the exit status, where pdb stopped, and each
    command with what pdb printed for it (stdin is not echoed, so the pairs are rebuilt here)."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(script), *args], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=timeout, cwd=Path(script).parent,
                          env={**os.environ, "PYTHONBREAKPOINT": "pdb.set_trace"})  # a reader's 0 would skip it
    before, *answers = done.stdout.replace(str(Path(script).resolve().parent) + os.sep, "").split("(Pdb) ")
    if not answers:
        raise RuntimeError(f"{Path(script).name} never reached the debugger ({done.returncode}):\n{done.stderr[-2000:]}")
    stopped = before[before.rfind("\n> ") + 1:] if "\n> " in before else before[before.find("> "):]
    pairs = [(cmd, out.rstrip("\n")) for cmd, out in zip(commands, answers)]
    transcript = stopped + "".join(f"(Pdb) {cmd}\n{out}\n" if out else f"(Pdb) {cmd}\n" for cmd, out in pairs)
    return {"returncode": done.returncode, "stopped_at": stopped.strip(), "answers": dict(pairs),
            "transcript": transcript.rstrip("\n")}


def _forward_line(caught) -> str:
    """The innermost frame of the forward traceback that anomaly mode attaches as a warning."""
    for w in caught:
        text = str(w.message)
        if "Traceback of forward call" in text:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
            where, code = lines[frames[-1]], lines[frames[-1] + 1]
            return f"in {where.rsplit(' in ', 1)[-1]}: {code}"
    return "(no forward traceback recorded)"


def epoch_runner(module: types.ModuleType, Z_train: np.ndarray, y_train: np.ndarray, seed: int = 0,
                 device: str = "cpu"):
    """A zero-argument function that trains one more epoch with the module's loader, model and
    loop (the schedule is built long enough for any number of calls)."""
    torch.manual_seed(seed)
    loader = module.make_loader(Z_train, y_train, 64, seed)
    model = module.make_model(Z_train.shape[1], 10, 128, 0.3).to(device)
    optimizer, scheduler = module.make_optimizer(model, 3e-3, 10_000, len(loader))
    return lambda: module.train_one_epoch(model, loader, optimizer, scheduler, device)


def torch_profile(fn) -> tuple[pd.DataFrame, float]:
    """Profile one call of ``fn`` with ``torch.profiler``: every recorded event (operator or
    labelled region) with its calls, self and total CPU ms, sorted by self CPU time; and the CPU
    time of the whole call in ms."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("one epoch"):
            fn()
    rows = [{"event": e.key, "calls": e.count, "self CPU ms": e.self_cpu_time_total / 1e3,
             "total CPU ms": e.cpu_time_total / 1e3} for e in prof.key_averages()]
    table = pd.DataFrame(rows).sort_values("self CPU ms", ascending=False)
    epoch_ms = float(table.loc[table["event"] == "one epoch", "total CPU ms"].iloc[0])
    return table[table["event"] != "one epoch"].reset_index(drop=True), epoch_ms


def python_profile(fn) -> pd.DataFrame:
    """Profile one call of ``fn`` with the standard library's ``cProfile``: every function called
    below ``fn`` with its file, calls and cumulative ms, sorted by cumulative time."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats
    rows = [{"function": func, "file": Path(file).name, "calls": calls, "cumulative ms": cumulative * 1e3}
            for (file, _line, func), (_primitive, calls, _own, cumulative, _callers) in stats.items()]
    table = pd.DataFrame(rows).sort_values("cumulative ms", ascending=False)
    table = table[~table["function"].isin(["<lambda>", "runcall"])]  # fn itself and the profiler
    return table.reset_index(drop=True)


def script_diff(context: int = 1) -> str:
    """The unified diff from ``train_broken.py`` to ``train_fixed.py``."""
    old, new = BROKEN.read_text().splitlines(), FIXED.read_text().splitlines()
    return "\n".join(difflib.unified_diff(old, new, BROKEN.name, FIXED.name, n=context, lineterm=""))


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def activation_stats(model: nn.Module, X: torch.Tensor) -> pd.DataFrame:
    """Forward hooks on every ReLU, one forward pass in eval mode: per layer, the mean activation,
    the share of outputs that are exactly zero, and the share of units that are zero for every
    example (dead units: no gradient reaches their weights). The model's mode is restored."""
    records, handles, was_training = {}, [], model.training
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            def hook(_module, _inputs, out, name=name):
                a = out.detach()
                records[f"relu {name}"] = {"mean": a.mean().item(), "zero share": (a == 0).float().mean().item(),
                                           "dead units": (a == 0).all(dim=0).float().mean().item()}
            handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(X.to(_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return pd.DataFrame.from_dict(records, orient="index")


def update_ratios(model: nn.Module, loss_fn, loader, lr: float, steps: int) -> pd.DataFrame:
    """The plain Adam loop of ``train_losses``, recording for every linear layer and step the
    size of the update relative to the weights, ||W_after - W_before|| / ||W_before||, with the
    loss. A common rule of thumb puts a healthy ratio near 1e-3; 1e-1 means each step rewrites
    a tenth of the layer."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = _device_of(model)
    layers = {f"layer {i}": m for i, m in enumerate((m for m in model.modules() if isinstance(m, nn.Linear)), 1)}
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    rows = []
    for step, (xb, yb) in enumerate(itertools.islice(batches, steps)):
        before = {name: m.weight.detach().clone() for name, m in layers.items()}
        optimizer.zero_grad()
        loss = loss_fn(model(xb.to(device)), yb.to(device))
        loss.backward()
        optimizer.step()
        ratios = {name: ((m.weight.detach() - before[name]).norm() / before[name].norm()).item()
                  for name, m in layers.items()}
        rows.append({"step": step, "loss": loss.item(), **ratios})
    return pd.DataFrame(rows)


def confident_errors(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confident learning's simplest rule (Northcutt, Jiang and Chuang, 2021), written out: with
    out-of-sample predicted probabilities, class j's threshold is the mean probability of j over
    the examples labelled j. An example is flagged when some other class reaches its own threshold
    and the given label's probability is below the given class's threshold; among the classes
    that reach their thresholds, the most probable one must not be the given label."""
    n_classes = probs.shape[1]
    thresholds = np.array([probs[labels == j, j].mean() for j in range(n_classes)])
    above = probs >= thresholds  # classes each example is confidently "in"
    masked = np.where(above, probs, -np.inf)
    confident = masked.argmax(axis=1)
    has_confident = above.any(axis=1)
    return has_confident & (confident != labels) & (probs[np.arange(len(labels)), labels] < thresholds[labels])


def loss_curves(model: nn.Module, loader, lr: float, steps: int, val: tuple | None = None,
                every: int = 10) -> pd.DataFrame:
    """The plain Adam loop of ``train_losses``; every ``every`` steps, the mean training loss of
    those steps and, if ``val = (X, y)`` tensors are given, the validation loss in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device, rows, window = _device_of(model), [], []
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    for step, (xb, yb) in enumerate(itertools.islice(batches, steps), 1):
        model.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if step % every == 0:
            row = {"step": step, "train": float(np.mean(window))}
            if val is not None:
                model.eval()
                with torch.no_grad():
                    row["val"] = nn.functional.cross_entropy(model(val[0].to(device)), val[1].to(device)).item()
            rows.append(row)
            window = []
    return pd.DataFrame(rows)


def loss_curve_catalogue(module: types.ModuleType, Z_train: np.ndarray, y_train: np.ndarray,
                         Z_val: np.ndarray, y_val: np.ndarray, seed: int, device="cpu",
                         steps: int = 300) -> dict[str, pd.DataFrame]:
    """Six short real runs of ``module``'s model, each with one classic problem planted: a healthy
    baseline (Adam, lr 1e-3), a learning rate too high (1e-1) and too low (1e-6), batches sorted by
    label instead of shuffled, 64 training examples without dropout (overfitting), and 40% of the
    labels replaced at random. Returns each run's loss curves (see ``loss_curves``)."""
    val = (torch.as_tensor(Z_val, dtype=torch.float32), torch.as_tensor(y_val))

    def net(dropout=0.3):
        torch.manual_seed(seed)
        return module.make_model(Z_train.shape[1], 10, 128, dropout).to(device)

    def loader(Z, y):
        return module.make_loader(Z, y, 64, seed)

    rng = np.random.default_rng(seed)
    order = np.argsort(y_train, kind="stable")
    by_label = list(zip(torch.as_tensor(Z_train[order], dtype=torch.float32).split(64),
                        torch.as_tensor(y_train[order]).split(64)))
    few = rng.choice(len(y_train), 64, replace=False)
    noisy = y_train.copy()
    replaced = rng.random(len(noisy)) < 0.4
    noisy[replaced] = rng.integers(0, 10, int(replaced.sum()))
    return {
        "healthy": loss_curves(net(), loader(Z_train, y_train), 1e-3, steps, val),
        "learning rate too high": loss_curves(net(), loader(Z_train, y_train), 1e-1, steps, val),
        "learning rate too low": loss_curves(net(), loader(Z_train, y_train), 1e-6, steps, val),
        "batches sorted by label": loss_curves(net(), by_label, 1e-3, steps, every=1),
        "64 examples, no dropout": loss_curves(net(0.0), loader(Z_train[few], y_train[few]), 1e-3, steps, val),
        "40% labels random": loss_curves(net(), loader(Z_train, noisy), 1e-3, steps, val),
    }
