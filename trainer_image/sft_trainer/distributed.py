"""Processes and devices: torchrun's environment, CPU threads, DDP or FSDP2 wrapping, the collectives the
loop needs, full state dicts for checkpoints (the same code for DDP and FSDP), and the stop signal all
ranks agree on.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft_contract.spec import DistributedStrategy


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a pod's cpu limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, int(quota)) if quota else cores)


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_threads(local_world: int) -> int:
    """Torch threads per process on CPU: the available cores shared by this node's processes.

    Every model size gets them: the benchmark measured 1 thread for small models (the old policy) at
    0.81x TRL's wall-clock, where TRL uses every core (BENCHMARKS.md). ``OMP_NUM_THREADS`` overrides.
    """
    return max(1, available_cores() // max(1, local_world))


# How long a collective may wait for a peer before it fails (and this rank exits PeerLost). Long enough
# for rank 0 to write a large checkpoint while the others wait at a barrier; without it a rank whose
# peer vanished (node lost, no TCP reset) waits forever holding its GPUs.
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 1800


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("SFT_COLLECTIVE_TIMEOUT_SECONDS",
                                                  DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)))


def lost_peer(error: BaseException) -> bool:
    """Whether a failure is a collective or the rendezvous store losing another rank (a reset
    connection, a timeout), as opposed to a bug or bad input on this rank."""
    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError, dist.DistBackendError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "third_party/gloo",
        "Gloo connectFullMesh failed", "Timed out waiting", "NCCL communicator was aborted", "Watchdog caught"))


def setup_distributed() -> Dist:
    """Read torchrun's environment; one process without it. gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_threads(local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return Dist(rank, world, local_rank, device)


def all_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- wrapping


def wrap(model, d: Dist, strategy: str, layers, *, param_dtype: torch.dtype | None, cpu_offload: bool):
    """DDP, or FSDP2 with every transformer layer and the root sharded; one process: the model itself."""
    if d.world == 1:
        return model
    if strategy == DistributedStrategy.fsdp.value:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        # bf16/fp16 compute with fp32 gradient reduction; the sharded master weights stay fp32.
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        kw: dict[str, Any] = {"mp_policy": mp}
        if cpu_offload and d.device.type == "cuda":
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[d.local_rank] if d.device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy, not two
    )


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model, d: Dist):
    """DDP's no_sync for all but the last backward of a step (FSDP and one process: nothing to skip)."""
    if d.world > 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------- state dicts


def gather_trainable(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable parameters and optimizer state as full, FQN-keyed dicts on rank 0 (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    msd, osd = get_state_dict(unwrap(model), optimizer, options=opts)
    return {k: v.detach().cpu() for k, v in msd.items()}, osd


def load_trainable(model, tensors: dict[str, torch.Tensor], optimizer=None, optim_state=None) -> None:
    """Load full, FQN-keyed trainable weights (and optimizer state) into a plain, DDP or FSDP model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    target = unwrap(model)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is None:
        set_model_state_dict(target, tensors, options=opts)
    else:
        set_state_dict(target, optimizer, model_state_dict=tensors, optim_state_dict=optim_state, options=opts)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on rank 0 (FSDP); every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------- stopping


class StopFlag:
    """SIGTERM (pod eviction, preemption, kill) and a first Ctrl-C ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): rely on the caller
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal acts normally

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)

    def requested(self, d: Dist) -> bool:
        """All ranks agree (a collective), so that every rank joins the checkpoint save."""
        flag = self.signal is not None
        if d.world > 1:
            flag = all_sum(1.0 if flag else 0.0, d) > 0
            if flag and self.signal is None:
                self.signal = signal.SIGTERM
        return flag

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signal).name
        except (ValueError, TypeError):
            return "stop signal"
