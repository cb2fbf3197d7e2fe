"""What all scripts of this chapter share: data, model, sampler, DDP/FSDP2, checkpoints.

Not a script: ``train_ddp.py``, ``pitfalls.py``, ``bench_ddp.py`` and ``slow_save.py``
import it, and the tests load it in-process. It imports torch at the top, which is why
those scripts import it only after parsing their flags (so ``--help`` answers at once).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


@dataclass(frozen=True)
class Config:
    """Everything that decides the numbers a run produces; a resumed run must match."""

    steps: int = 40
    global_batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    samples: int = 1024
    features: int = 16
    hidden: int = 64
    norm: str = "none"  # "none", "batch" (per-rank statistics) or "global"
    drop_last: bool = True


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def attempt(self) -> int:
        """How many times torchrun has restarted the worker group (0: first try)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def setup(cpu: bool = False) -> Env:
    """Join the process group when torchrun started us; otherwise be one plain process.

    Workers use CUDA and NCCL only when every local worker gets a GPU of its own (NCCL
    refuses two ranks on one device); otherwise, or with ``cpu=True``, CPU and gloo.
    """
    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = not cpu and torch.cuda.is_available()
    cuda = cuda and torch.cuda.device_count() >= workers
    if "RANK" not in os.environ:
        return Env(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    exit_with_the_agent()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device)


def exit_with_the_agent(poll_s: float = 0.2) -> threading.Thread:
    """Exit this worker when the torchrun agent that started it dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of the agent reaches
    no worker: they would train on as orphans, adopted by init, and write final.pt for a
    job that no longer exists. The kernel reparents an orphan, so the parent pid changes;
    a daemon thread polls it. (``prctl(PR_SET_PDEATHSIG)`` fires when the parent *thread*
    that started the worker ends, not the process, and exists only on Linux.)
    """
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_s)
        print(f"rank {os.environ.get('RANK', '?')}: torchrun agent (pid {agent}) is gone; "
              "exiting rather than training on as an orphan", file=sys.stderr, flush=True)
        os._exit(75)

    thread = threading.Thread(target=watch, name="exit-with-the-agent", daemon=True)
    thread.start()
    return thread


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def make_data(cfg: Config) -> TensorDataset:
    """A seeded regression problem, the same on every rank (each reads its share)."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.samples, cfg.features, generator=g)
    w = torch.randn(cfg.features, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(cfg.samples, 1, generator=g)
    return TensorDataset(x, y)


def make_loader(data: TensorDataset, cfg: Config, env: Env):
    """A DataLoader over this rank's share of the data, and the sampler picking it."""
    if cfg.global_batch % env.world:
        raise ValueError(
            f"global batch {cfg.global_batch} does not split evenly over {env.world} "
            f"workers; use a multiple of {env.world} so that every share is the same"
        )
    sampler = DistributedSampler(
        data, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        data, batch_size=cfg.global_batch // env.world, sampler=sampler,
        drop_last=cfg.drop_last,
    )
    if len(loader) == 0:
        raise ValueError(f"{cfg.samples} samples make no batch of {cfg.global_batch}")
    return loader, sampler


def batches(loader: DataLoader, sampler: DistributedSampler, start: int, steps: int):
    """Yield (step, x, y) for start <= step < steps, resuming mid-epoch if need be."""
    per_epoch, step = len(loader), start
    while step < steps:
        epoch, done = divmod(step, per_epoch)
        sampler.set_epoch(epoch)  # without this, every epoch repeats the same order
        for x, y in itertools.islice(loader, done, None):
            if step >= steps:
                return
            yield step, x, y
            step += 1


class AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all ranks, differentiably: the gradient of a sum over ranks is
    the sum over ranks of the incoming gradients, so backward is one more all-reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d with statistics over the global batch, as nn.SyncBatchNorm on GPUs.

    nn.SyncBatchNorm refuses CPU modules under DDP, so this all-reduces the per-rank
    sums itself, through AllReduceSum, so that gradients flow through the shared
    statistics exactly as in one process that sees the whole batch.
    """

    sync = False  # wrap() turns it on when there is more than one worker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.sync):
            return super().forward(x)
        n = torch.tensor(float(x.shape[0]), device=x.device)
        dist.all_reduce(n)  # the global batch size (no gradient needed)
        mean = AllReduceSum.apply(x.sum(0)) / n
        var = AllReduceSum.apply(((x - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def make_model(cfg: Config) -> nn.Sequential:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    norm = {"none": nn.Identity, "batch": nn.BatchNorm1d, "global": GlobalBatchNorm}
    return nn.Sequential(
        nn.Linear(cfg.features, cfg.hidden), norm[cfg.norm](cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, 1),
    )


def wrap(model: nn.Module, env: Env, *, shard=False, bucket_cap_mb=25.0) -> nn.Module:
    """DDP (a full replica per rank) or FSDP2 (each rank keeps 1/world of a tensor).

    ``bucket_cap_mb=None`` is DDP's own default: 25 MiB buckets, but the first one (the
    last gradients of backward) capped at 1 MiB; a number given explicitly caps them all.
    """
    model = model.to(env.device)
    if env.world == 1:
        return model
    for m in model.modules():
        if isinstance(m, GlobalBatchNorm):
            m.sync = True
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)  # one all-gather per layer, just before it runs
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.local_rank] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)


def local_bytes(tensors) -> int:
    """Bytes this rank really stores for ``tensors`` (a sharded tensor: its shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def fsdp_cpu_probes() -> dict:
    """Try two FSDP2 options on this rank's device; record "works" or the error."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    options = {"bf16_mixed_precision": {"mp_policy": bf16},
               "cpu_offload": {"offload_policy": CPUOffloadPolicy()}}
    found = {}
    for name, kwargs in options.items():
        try:  # both ranks fail at the same place, before any collective: nothing hangs
            layer = fully_shard(nn.Linear(8, 8), **kwargs)
            layer(torch.randn(4, 8)).sum().backward()
            found[name] = "works"
        except RuntimeError as err:
            found[name] = f"{type(err).__name__}: {err}"
    return found


def get_full_state(model: nn.Module, opt, shard: bool = False) -> tuple[dict, dict]:
    """Model and optimizer state as full (unsharded) tensors on the CPU.

    DDP and one process hold full tensors already. FSDP2 gathers them with
    torch.distributed.checkpoint, a collective: every rank must call this.
    """
    if shard:
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dcp.get_state_dict(model, opt, options=options)
    module = getattr(model, "module", model)  # DDP wraps the model in .module
    msd = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return msd, opt.state_dict()


def set_full_state(model: nn.Module, opt, msd: dict, osd: dict, shard: bool = False):
    if shard:
        from torch.distributed.checkpoint import state_dict as dcp

        dcp.set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                           options=dcp.StateDictOptions(full_state_dict=True))
        return
    getattr(model, "module", model).load_state_dict(msd)
    opt.load_state_dict(osd)


class CheckpointError(RuntimeError):
    """A checkpoint file that is empty, cut short, unreadable, or whose digest fails."""


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or weight: training stops before the damage is saved."""


DIGEST_KEY = "sha256"
KEEP = 3  # checkpoints kept per run: the newest that verifies is the one resumed from


def content_digest(obj) -> str:
    """SHA-256 of everything in ``obj``: every tensor's dtype, shape and bytes, every key,
    number and string, in a fixed order. Stored in the checkpoint, recomputed on load."""
    h = hashlib.sha256()

    def feed(o) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)};".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k in sorted(o, key=repr):
                feed(k)
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)};".encode())
            for v in o:
                feed(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    feed(obj)
    return h.hexdigest()


def save_checkpoint(obj: dict, path: Path, *, atomic=True, chunk_delay_s=0.0) -> None:
    """Write ``obj`` and its SHA-256 digest so that ``path`` always holds a whole
    checkpoint, old or new, and ``read_checkpoint`` can tell when it no longer does.

    Atomic: write a temporary file beside the target, flush it to disk, then rename it
    over the target (a rename within one file system is all-or-nothing on POSIX).
    ``atomic=False`` writes in place, the common mistake, kept to show what it costs.
    ``chunk_delay_s`` sleeps after every MiB to simulate a slow disk.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save({**obj, DIGEST_KEY: content_digest(obj)}, buf)
    data = buf.getbuffer()
    target = tmp_path(path) if atomic else path
    with open(target, "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
            if chunk_delay_s:
                f.flush()
                time.sleep(chunk_delay_s)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    if atomic:
        os.replace(target, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself is on disk too
        finally:
            os.close(folder)


def tmp_path(path: Path) -> Path:
    """Where ``save_checkpoint`` writes before renaming: a hidden file beside ``path``."""
    return path.with_name(f".{path.name}.tmp")


def read_checkpoint(path: Path) -> dict:
    """The verified contents of the checkpoint at ``path``, without its digest.

    Raises CheckpointError naming the file and what is wrong with it: empty, cut short or
    otherwise unreadable, without a digest, or with contents that no longer match it.
    """
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError names a missing file already
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write that created it "
                              "never got its data")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # runs no code
    except Exception as err:  # a torn zip: RuntimeError, OSError, EOFError, ...
        first = (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read ({size} bytes; cut short or "
                              f"overwritten?): {type(err).__name__}: {first}") from err
    if not isinstance(state, dict) or DIGEST_KEY not in state:
        raise CheckpointError(f"{path} carries no SHA-256 digest; refusing to trust it")
    stored = state.pop(DIGEST_KEY)
    if (actual := content_digest(state)) != stored:
        raise CheckpointError(f"{path} is corrupt: SHA-256 digest mismatch (stored "
                              f"{stored[:12]}..., contents {actual[:12]}...)")
    return state


def load_checkpoint(path: Path, cfg: Config, shard: bool = False) -> dict | None:
    """The verified checkpoint at ``path`` (None if there is none); refused if another
    run's (ValueError) or damaged (CheckpointError)."""
    path = Path(path)
    if not path.exists():
        return None
    state = read_checkpoint(path)  # CheckpointError if damaged
    saved = {**state.get("config", {}), "shard": state.get("shard")}
    wrong = {k: (saved.get(k), v) for k, v in {**asdict(cfg), "shard": shard}.items()
             if saved.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}"
                           for k, (a, b) in wrong.items())
        raise ValueError(f"{path} was written by a different run ({detail}); "
                         "refusing to resume from it")
    return state


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"checkpoint-{step:06d}.pt"


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in ``folder``, newest (highest step) first."""
    return sorted(Path(folder).glob("checkpoint-*.pt"), reverse=True)


def save_and_prune(state: dict, folder: Path, keep: int = KEEP) -> Path:
    """Save the checkpoint of ``state["step"]``, then delete all but the newest ``keep``."""
    path = checkpoint_path(folder, state["step"])
    save_checkpoint(state, path)
    for old in checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def find_resume(folder: Path, cfg: Config, shard: bool = False, clean: bool = True):
    """The newest checkpoint in ``folder`` that verifies, and what was passed over.

    Returns (state or None, path or None, [(file name, why it was skipped)]). A damaged
    file is skipped for the next older one and, with ``clean`` (rank 0 only), renamed to
    NAME.corrupt: kept for a post-mortem, but no longer counted among the newest --keep.
    Leftover temporary files of interrupted writes are removed. A checkpoint of another
    run is an error, not a fall-back, and so is a folder in which nothing verifies:
    starting again from step 0 in silence would throw the run away.
    """
    folder, skipped = Path(folder), []
    for tmp in sorted(folder.glob(".checkpoint-*.pt.tmp")):
        skipped.append((tmp.name, "temporary file of an interrupted write, "
                                  + ("removed" if clean else "left to rank 0")))
        if clean:
            tmp.unlink(missing_ok=True)
    found = checkpoints(folder)
    for path in found:
        try:
            return load_checkpoint(path, cfg, shard), path, skipped
        except FileNotFoundError:  # rank 0 moved it aside while this rank looked
            skipped.append((path.name, "moved aside by rank 0"))
        except CheckpointError as err:
            skipped.append((path.name, f"{err}; " + (f"renamed to {path.name}.corrupt"
                                                     if clean else "left to rank 0")))
            if clean:
                path.replace(path.with_name(path.name + ".corrupt"))
    if found:
        detail = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise CheckpointError(f"no checkpoint in {folder} verifies: {detail}")
    return None, None, skipped


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def dcp_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"dcp-{step:06d}"


def dcp_checkpoints(folder: Path) -> list[Path]:
    """The sharded (DCP) checkpoint folders in ``folder``, newest first."""
    return sorted((p for p in Path(folder).glob("dcp-??????") if p.is_dir()), reverse=True)


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's name and bytes in a DCP folder (but digest.json itself)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.name != "digest.json":
            h.update(f"{f.name}:{f.stat().st_size};".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def save_dcp(model, opt, cfg: Config, step: int, folder: Path, env: Env, keep: int = KEEP):
    """A sharded checkpoint: every rank writes its own shards with torch.distributed.checkpoint.

    No rank ever holds the full state. Atomic like ``save_checkpoint``, one level up: the
    ranks write into a hidden temporary folder, rank 0 adds the settings and a digest of
    every file, then renames the folder into place.
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = dcp_path(folder, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if env.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(env)
    msd, osd = get_state_dict(model, opt)  # under FSDP2: DTensors, this rank's shards only
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    barrier(env)  # every rank's shards, and rank 0's .metadata, are written
    if env.rank == 0:
        meta = {"step": step, "config": asdict(cfg), "world": env.world}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        (tmp / "digest.json").write_text(json.dumps({"sha256": folder_digest(tmp)}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in dcp_checkpoints(folder)[keep:]:
            shutil.rmtree(old)
    barrier(env)


def read_dcp_meta(path: Path, cfg: Config) -> dict:
    """The settings of the DCP checkpoint at ``path``, after checking its digest and run."""
    try:
        stored = json.loads((path / "digest.json").read_text())["sha256"]
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} is incomplete: {type(err).__name__}: {err}") from err
    if (actual := folder_digest(path)) != stored:
        raise CheckpointError(f"{path} is corrupt: SHA-256 digest mismatch (stored "
                              f"{stored[:12]}..., files {actual[:12]}...)")
    if meta["config"] != asdict(cfg):
        wrong = {k: (v, asdict(cfg)[k]) for k, v in meta["config"].items() if asdict(cfg)[k] != v}
        raise ValueError(f"{path} was written by a different run ({wrong}); refusing it")
    return meta


def load_dcp(model, opt, folder: Path, cfg: Config, env: Env):
    """Resume from the newest DCP checkpoint that verifies, at any world size.

    DCP reads, for each tensor this rank holds now, the pieces of it that the saving ranks
    wrote, whatever their number: that is resharding. Returns (meta or None, path, skipped).
    A damaged folder is skipped for the next older one (every rank checks the digest
    itself, so all ranks choose the same); a folder in which nothing verifies is an error,
    as in ``find_resume``, and so is another run's checkpoint (ValueError).
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    skipped = []
    for tmp in sorted(Path(folder).glob(".dcp-*.tmp")):
        skipped.append((tmp.name, "temporary folder of an interrupted save, removed"))
    barrier(env)  # every rank has listed it before rank 0 removes it
    if env.rank == 0:
        for tmp in Path(folder).glob(".dcp-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    found = dcp_checkpoints(folder)
    for path in found:
        try:
            meta = read_dcp_meta(path, cfg)
        except CheckpointError as err:
            skipped.append((path.name, str(err)))
            continue
        for t in model.parameters():  # SGD creates its momentum at the first step: make
            t.grad = torch.zeros_like(t)  # it exist (a zero step changes no weight) for
        opt.step()                        # DCP to load into
        opt.zero_grad(set_to_none=True)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return meta, path, skipped
    if found:
        detail = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise CheckpointError(f"no sharded checkpoint in {folder} verifies: {detail}")
    return None, None, skipped


def train(cfg: Config, env: Env, *, shard=False, bucket_cap_mb=25.0, ckpt_dir=None,
          ckpt_every=0, keep=KEEP, before_step=None, log=None, resumed=None, sharded_ckpt=False,
          stop_at=None):
    """Train for cfg.steps steps, resuming from the newest good checkpoint in ``ckpt_dir``.

    Returns (model, optimizer, first step run, [(step, loss averaged over ranks)]).
    ``resumed``, a dict if given, receives the file resumed from and the ones skipped.
    ``sharded_ckpt``: DCP checkpoints (each rank writes its shards) instead of rank 0's
    single file. ``stop_at``: end after that many steps, as a job that is preempted would.
    Raises NonFiniteError, on every rank at the same step, when the loss is NaN or inf,
    or the weights are, before a checkpoint and at the end.
    """
    loader, sampler = make_loader(make_data(cfg), cfg, env)
    model = wrap(make_model(cfg), env, shard=shard, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    start, losses = 0, []
    if ckpt_dir is not None and sharded_ckpt:
        meta, path, skipped = load_dcp(model, opt, ckpt_dir, cfg, env)
        start = meta["step"] if meta else 0
        if resumed is not None:
            resumed.update(path=path and path.name, skipped=skipped,
                           saved_by=meta and meta["world"])
    elif ckpt_dir is not None:
        state, path, skipped = None, None, []
        if env.rank == 0:  # rank 0 decides (and moves damaged files aside) ...
            state, path, skipped = find_resume(ckpt_dir, cfg, shard)
        if env.world > 1:  # ... and every rank resumes from the file it chose
            chosen = [path and path.name]
            dist.broadcast_object_list(chosen, src=0)
            if env.rank != 0 and chosen[0] is not None:
                path = Path(ckpt_dir) / chosen[0]
                state = load_checkpoint(path, cfg, shard)
        if state is not None:
            set_full_state(model, opt, state["model"], state["optim"], shard)
            start = state["step"]
        if resumed is not None:
            resumed.update(path=path and path.name, skipped=skipped)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step, x, y in batches(loader, sampler, start, end):
        if before_step is not None:
            before_step(step)
        loss = F.mse_loss(model(x.to(env.device)), y.to(env.device))
        mean_loss = loss.detach().clone()
        if env.world > 1:  # every rank gets the same number, so every rank stops alike
            dist.all_reduce(mean_loss)
            mean_loss /= env.world
        if not math.isfinite(value := float(mean_loss)):
            raise NonFiniteError(f"step {step}: the loss averaged over {env.world} rank(s) "
                                f"is {value}; stopping before this step's update, so no "
                                "checkpoint and no final.pt holds it")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients; FSDP2 reduce-scatters them
        opt.step()
        losses.append((step, value))
        if log is not None:
            log(step, value)
        if ckpt_dir is not None and ckpt_every and (step + 1) % ckpt_every == 0:
            check_finite_weights(model, env, step)
            if sharded_ckpt:
                save_dcp(model, opt, cfg, step + 1, ckpt_dir, env, keep)
                continue
            msd, osd = get_full_state(model, opt, shard)
            if env.rank == 0:
                save_and_prune({"step": step + 1, "model": msd, "optim": osd,
                                "config": asdict(cfg), "shard": shard}, ckpt_dir, keep)
    check_finite_weights(model, env, end - 1)  # the last update had no loss after it
    return model, opt, start, losses


def check_finite_weights(model: nn.Module, env: Env, step: int) -> None:
    """Raise NonFiniteError on every rank if any rank's parameters (or shard) hold NaN/inf."""
    bad = sum(not bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())
              for t in model.parameters())
    flag = torch.tensor(float(bad), device=env.device)
    if env.world > 1:
        dist.all_reduce(flag)
    if flag.item():
        raise NonFiniteError(f"after step {step}: {int(flag.item())} parameter tensor(s) "
                             "hold NaN or inf; nothing saved")


def full_dataset_loss(msd: dict, cfg: Config) -> float:
    """Mean squared error of these parameters on the whole data set, in one process."""
    model = make_model(cfg)
    model.load_state_dict(msd)
    model.eval()
    x, y = make_data(cfg).tensors
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))
