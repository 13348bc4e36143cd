"""Process-group set-up and teardown: gloo on CPU, nccl on CUDA; rank and world size from the launcher.

Only DeepSpeed runs start a process group (the single-process engine has none). Teardown is explicit and in a
fixed order (engine → barrier → process group): a process group left to the interpreter's exit can abort the
process ("terminate called without an active exception") after a run that trained fine.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger("unipt_scale")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process() -> DistContext:
    return DistContext(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_accelerator() -> None:
    """DeepSpeed picks its accelerator once, at first use: on a machine without CUDA it must be the CPU one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def use_cuda() -> bool:
    """CUDA unless DeepSpeed was told to use another accelerator (DS_ACCELERATOR=cpu: a CPU rehearsal)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def init_process_group() -> DistContext:
    """Join (or create) the process group. Without launcher variables the run is a one-process group on
    127.0.0.1; DeepSpeed's MPI launchers are recognised by their OMPI variables."""
    pick_accelerator()
    import deepspeed

    cuda = use_cuda()
    mpi = "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ
    if "RANK" not in os.environ and not mpi:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=mpi, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # MPI discovery sets it only now
    if not cuda:
        release_shm_segment(torch.distributed.get_rank())
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_segment_path(rank: int) -> str:
    """The name DeepSpeed's CPU shared-memory all-reduce gives rank `rank`'s workspace (ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_segment(rank: int) -> None:
    """Unlink this rank's CPU all-reduce workspace once every rank has mapped it.

    DeepSpeed creates a 66 MB /dev/shm segment per rank when all ranks are local and never unlinks it, so each
    CPU run (and every killed one) leaves its segments in RAM-backed /dev/shm for good. Every rank maps every
    other rank's segment inside init_distributed; after a barrier the names are no longer needed, and an
    unlinked segment lives exactly as long as the processes that map it.
    """
    path = shm_segment_path(rank)
    torch.distributed.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # not all ranks local: DeepSpeed made no segment
        pass


def shutdown_process_group() -> None:
    """Every rank reaches this point, then the group is destroyed (its threads joined) before exit."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    try:
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (the object itself when there is no process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
