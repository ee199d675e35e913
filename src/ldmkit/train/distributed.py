"""Data parallelism through torch.distributed, launched by torchrun: DDP or FSDP2.

Kept apart from the model and the training loop: the trainer asks for a ``Dist`` (who am I, which
device), wraps its model with ``wrap_model`` and gathers/scatters full state dicts through the helpers
below, which work the same with no process group, DDP or FSDP2. Checkpoints always hold *full*
(unsharded) tensors keyed by parameter name, so a run written by N ranks resumes on M.

The device comes from LOCAL_RANK (never the global rank: on node 2 of a multi-node job the global rank
is >= the number of local GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

_OWNED_GROUP = False  # True when init_distributed started the process group (and shutdown ends it)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto", timeout_min: float = 30.0) -> Dist:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and start the process group.

    Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) this starts nothing and returns rank 0 of 1.
    NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    requested = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available()
                             else "cpu" if device_name == "auto" else device_name)
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device_name!r} but CUDA is not available")
        # One GPU per process: under torchrun the local rank picks it; alone, cuda:N is honoured.
        index = local_rank if world > 1 else (requested.index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = requested
    if world > 1 and not dist.is_initialized():
        global _OWNED_GROUP
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
        _OWNED_GROUP = True
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown() -> None:
    """End the process group if ``init_distributed`` started it (a caller's own group is left alone)."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def sum_across_ranks(d: Dist, values: Tensor) -> Tensor:
    if not d.enabled:
        return values
    t = values.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(d: Dist, obj: Any) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------------


def fsdp_units(model: nn.Module) -> Iterable[nn.Module]:
    """The modules FSDP2 shards one by one (and compile compiles one by one): the transformer blocks."""
    units = getattr(model, "blocks", None)
    if units is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to shard; FSDP needs them")
    return list(units)


def wrap_model(model: nn.Module, d: Dist, parallel: str, precision: str) -> nn.Module:
    """The module the training step calls: ``model`` itself, DDP(model) or the FSDP2-sharded model.

    FSDP2 shards parameters in place (they become DTensors), so ``model`` and the returned module are
    the same object; with DDP they differ and the caller keeps ``model`` for names and EMA.
    """
    if parallel == "none" or (parallel == "auto" and not d.enabled):
        return model
    if parallel in ("ddp", "auto"):
        if not d.enabled:
            return model  # DDP over one process is a no-op: skip its bucket copies
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16/fp16: compute and gather parameters in low precision, reduce gradients in fp32.
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        if not d.enabled and not dist.is_initialized():
            raise RuntimeError("train.parallel=fsdp needs a process group: launch with torchrun")
        for unit in fsdp_units(model):
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"train.parallel: unknown mode {parallel!r}; expected auto, none, ddp or fsdp")


def param_norm(params: list[Tensor], d: Dist) -> float:
    """Global L2 norm of the parameters, whole or FSDP2-sharded (the same on every rank)."""
    shards = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    sharded = len(shards) > 0 and hasattr(params[0], "to_local")
    square = torch.stack([n.float() ** 2 for n in torch._foreach_norm(shards)]).sum() if shards \
        else torch.zeros(())
    if sharded:  # each rank holds a disjoint shard; replicated (DDP) weights are already whole
        square = sum_across_ranks(d, square)
    return float(square.sqrt())


# --------------------------------------------------------------------------------------------------
# Full (unsharded) state dicts, identical for 1 process, DDP and FSDP2
# --------------------------------------------------------------------------------------------------


def full_model_state(model: nn.Module, d: Dist) -> dict[str, Tensor]:
    """Full CPU state dict on rank 0 (empty on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in sd.items()} if d.is_main else {}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name (world-size independent), on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if d.is_main else {}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor], d: Dist) -> None:
    """Load a full state dict (needed on rank 0 only when distributed) into a plain/DDP/FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled, strict=True)
    set_model_state_dict(model, state if d.is_main or not d.enabled else {}, options=opts)


_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any], d: Dist) -> None:
    """Load a full, name-keyed optimizer state; the implementation flags of *this* run are kept (a
    checkpoint from a GPU run with fused AdamW resumes on a CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    impl = [{k: g.get(k) for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled)
    set_optimizer_state_dict(model, optimizer, state if d.is_main or not d.enabled else {}, options=opts)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)
