"""Process group and the 2-D device mesh (data parallel x tensor parallel).

Every rank of a `torchrun` job belongs to one DP group and one TP group:

    mesh[dp, tp] = rank,  rank = dp_rank * tp + tp_rank

so the TP ranks of one model replica are adjacent (the same node when tp <= GPUs per node,
where the per-block all-reduces need the fastest links), and each DP group spans replicas.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelContext:
    """Where this process sits in the job.

    mesh: the 2-D `DeviceMesh` with dims ("dp", "tp"), or None in a single process.
    device: this rank's device (cuda:LOCAL_RANK on GPU, cpu otherwise).
    """

    mesh: DeviceMesh | None
    device: torch.device
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0

    def layout(self) -> dict:
        """JSON-safe description, recorded in checkpoints."""
        return {"world_size": self.world_size, "dp": self.dp_size, "tp": self.tp_size}


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 or RANK."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(tp: int = 1, device: str = "auto") -> ParallelContext:
    """Joins the job started by `torchrun` and builds the (dp, tp) mesh.

    Backend: nccl when the device is CUDA, gloo on CPU. A process not started by torchrun
    (WORLD_SIZE unset or 1) and tp == 1 gets a single-process context without a process group.

    Raises:
        ValueError: tp does not divide the world size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1:
        raise ValueError(f"--tp must be at least 1, got {tp}")
    if world % tp:
        raise ValueError(f"tensor-parallel degree {tp} does not divide the {world} ranks of this job")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return ParallelContext(None, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return build_context(tp, dev)


def build_context(tp: int, device: torch.device) -> ParallelContext:
    """The (dp, tp) mesh over an already initialised default process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"tensor-parallel degree {tp} does not divide the {world} ranks of this job")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelContext(mesh, device, rank, world, mesh.get_local_rank("dp"), world // tp,
                           mesh.get_local_rank("tp"), tp)


def teardown() -> None:
    """Destroys the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()
