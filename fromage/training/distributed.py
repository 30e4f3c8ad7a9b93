"""Data-parallel processes for training, on Hugging Face Accelerate's process state.

Accelerate sets up the process group (gloo on CPU, NCCL on GPU) and the device of each process,
whether the processes came from `accelerate launch -m fromage.cli train …`, `torchrun`, or
`fromage train --num-processes N` (which spawns them here through `launch`). The trainable
part of FROMAGe is a few million parameters, so instead of wrapping the model in DDP the loop
sums their gradients with one flat all-reduce per step: every process then takes the same
optimiser step and the replicas never drift apart (see training/step.py for how losses are normalised
so that the sum is exactly the single-process gradient).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy; the input is left alone)."""
        out = values.detach().clone()
        if self.distributed:
            dist.all_reduce(out)
        return out

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over processes: one flat all-reduce."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of a global batch (sizes must divide evenly)."""
        if len(items) % self.world_size:
            raise ValueError(f"a batch of {len(items)} does not split over {self.world_size} processes")
        size = len(items) // self.world_size
        return items[self.rank * size : (self.rank + 1) * size]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        self.world_size = 1


def init_processes(device: str = "auto") -> Processes:
    """Join the process group described by the launcher's environment (WORLD_SIZE, RANK, …);
    a plain run is a single process on `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return Processes(0, 1, torch.device(device))
    try:
        from accelerate import PartialState
    except ImportError as error:
        raise ImportError(
            "data-parallel training needs Hugging Face Accelerate: pip install 'fromage[distributed]'"
        ) from error

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, torch.device(state.device))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_rank(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # gloo picks an interface from the host name, which may not resolve: stay on loopback.
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    fn(*args)


def launch(fn: Callable[..., Any], args: tuple, num_processes: int) -> None:
    """Run `fn(*args)` in `num_processes` fresh processes on this machine (loopback rendezvous),
    as `accelerate launch` would; an error in any process is raised here."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    import torch.multiprocessing as mp

    # Threads per process: the cores shared out, so N processes do not oversubscribe the CPU.
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    mp.start_processes(
        _run_rank,
        args=(num_processes, _free_port(), fn, args),
        nprocs=num_processes,
        start_method="spawn",
    )
