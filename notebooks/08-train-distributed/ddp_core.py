"""What all scripts of this chapter share: data, model, sampler, DDP/FSDP2, checkpoints.

Not a script: ``train_ddp.py``, ``pitfalls.py``, ``bench_ddp.py`` and ``slow_save.py``
import it, and the tests load it in-process. It imports torch at the top, which is why
those scripts import it only after parsing their flags (so ``--help`` answers at once).
"""

from __future__ import annotations

import io
import itertools
import os
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
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device)


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
    """DDP (a full replica per rank) or FSDP2 (each rank keeps 1/world of a tensor)."""
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


def save_checkpoint(obj: dict, path: Path, *, atomic=True, chunk_delay_s=0.0) -> None:
    """Write ``obj`` so that ``path`` always holds a whole checkpoint, old or new.

    Atomic: write a temporary file beside the target, flush it to disk, then rename it
    over the target (a rename within one file system is all-or-nothing on POSIX).
    ``atomic=False`` writes in place, the common mistake, kept to show what it costs.
    ``chunk_delay_s`` sleeps after every MiB to simulate a slow disk.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    target = path.with_name(f".{path.name}.tmp") if atomic else path
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


def load_checkpoint(path: Path, cfg: Config, shard: bool = False) -> dict | None:
    """The checkpoint at ``path`` (None if there is none); refused if another run's."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # runs no code
    saved = {**state.get("config", {}), "shard": state.get("shard")}
    wrong = {k: (saved.get(k), v) for k, v in {**asdict(cfg), "shard": shard}.items()
             if saved.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}"
                           for k, (a, b) in wrong.items())
        raise ValueError(f"{path} was written by a different run ({detail}); "
                         "refusing to resume from it")
    return state


def train(cfg: Config, env: Env, *, shard=False, bucket_cap_mb=25.0, ckpt=None,
          ckpt_every=0, before_step=None, log=None):
    """Train for cfg.steps steps, resuming from ``ckpt`` if it exists.

    Returns (model, optimizer, first step run, [(step, loss averaged over ranks)]).
    """
    loader, sampler = make_loader(make_data(cfg), cfg, env)
    model = wrap(make_model(cfg), env, shard=shard, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    start, losses = 0, []
    if ckpt is not None and (state := load_checkpoint(ckpt, cfg, shard)) is not None:
        set_full_state(model, opt, state["model"], state["optim"], shard)
        start = state["step"]
    for step, x, y in batches(loader, sampler, start, cfg.steps):
        if before_step is not None:
            before_step(step)
        loss = F.mse_loss(model(x.to(env.device)), y.to(env.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients; FSDP2 reduce-scatters them
        opt.step()
        mean_loss = loss.detach().clone()
        if env.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= env.world
        losses.append((step, float(mean_loss)))
        if log is not None:
            log(step, float(mean_loss))
        if ckpt is not None and ckpt_every and (step + 1) % ckpt_every == 0:
            msd, osd = get_full_state(model, opt, shard)
            if env.rank == 0:
                save_checkpoint({"step": step + 1, "model": msd, "optim": osd,
                                 "config": asdict(cfg), "shard": shard}, ckpt)
    return model, opt, start, losses


def full_dataset_loss(msd: dict, cfg: Config) -> float:
    """Mean squared error of these parameters on the whole data set, in one process."""
    model = make_model(cfg)
    model.load_state_dict(msd)
    model.eval()
    x, y = make_data(cfg).tensors
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))
