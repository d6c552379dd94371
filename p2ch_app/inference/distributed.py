"""Several processes on one job, as torchrun starts them: which rank this process is, its device, its
share of the CPU, its share of a list of work, and the gathering of every rank's results.

The training loop (DistributedDataParallel) and nodule-analyze --validation (series sharded over ranks)
both start here. Launched by torchrun, even with one process, a process group starts: NCCL when this
rank runs on a GPU (its own: cuda:LOCAL_RANK), gloo on CPUs. Outside torchrun nothing starts and every
function here acts as for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from p2ch_app.inference.runtime import select_device


@dataclass(frozen=True)
class Ranks:
    """This process among the job's: rank of world (over every node), and among this node's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    distributed: bool = False  # a process group runs (under torchrun), even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks()


def launched_world() -> int:
    """How many processes torchrun started for this job (1 outside torchrun), before any group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or launched_world() > 1


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_threads(local_world: int, cores: int | None = None) -> int:
    """Torch threads for one of local_world CPU ranks on this node: an equal share of the cores, so the
    ranks together use every core once instead of each taking all of them."""
    return max(1, (usable_cores() if cores is None else cores) // max(1, local_world))


def start_ranks(device_name: str) -> tuple[Ranks, torch.device]:
    """This process's rank and device. Under torchrun: a GPU rank takes cuda:LOCAL_RANK (NCCL), a CPU
    rank (gloo) takes its share of the node's cores (cpu_threads: torchrun's default of one thread per
    rank would leave the others idle)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if not _under_torchrun():
        return SINGLE, device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives and barriers use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size())))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, local_world, distributed=True)
    if device.type == "cpu" and local_world > 1:
        torch.set_num_threads(cpu_threads(local_world))
    return ranks, device


def stop_ranks() -> None:
    """Leave the process group, where one runs: a rank that exits with gloo's threads still running
    can abort ("terminate called without an active exception") and fail the whole torchrun job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if ranks.distributed:
        dist.barrier()


def shares(costs: Sequence[float], world: int) -> list[list[int]]:
    """The item numbers each of world ranks takes: the costliest item first, each to the rank with the
    least cost so far (the lower rank on a tie), each rank's in item order. Equal costs give every
    world-th item from the rank on, so neighbours (series of one kind, sorted by UID) spread over the
    ranks; unequal ones (CTs of 100 to 700 slices) end the ranks' work closer together."""
    loads, taken = [0.0] * world, [[] for _ in range(world)]
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world), key=lambda r: (loads[r], r))
        taken[rank].append(item)
        loads[rank] += costs[item]
    return [sorted(items) for items in taken]


def shard(items: list, ranks: Ranks, costs: Sequence[float] | None = None) -> list:
    """This rank's share of items (shares; costs: one per item, equal when None); gather_in_order with
    the same costs puts the results back in items' order."""
    return [items[i] for i in shares(_or_equal(costs, len(items)), ranks.world)[ranks.rank]]


def _or_equal(costs: Sequence[float] | None, count: int) -> Sequence[float]:
    return [1.0] * count if costs is None else costs


def gather_objects(obj, ranks: Ranks) -> list:
    """Every rank's obj (any picklable value), in rank order, on every rank: [obj] in a single process."""
    if not ranks.distributed:
        return [obj]
    gathered = [None] * ranks.world
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_in_order(mine: list, ranks: Ranks, costs: Sequence[float] | None = None) -> list:
    """The inverse of shard: each rank's results of shard(items, ranks, costs), in one list in items' order."""
    parts = gather_objects(mine, ranks)
    count = sum(len(part) for part in parts)
    merged = [None] * count
    for taken, part in zip(shares(_or_equal(costs, count), ranks.world), parts):
        for item, result in zip(taken, part, strict=True):
            merged[item] = result
    return merged
