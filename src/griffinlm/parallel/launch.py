"""Spawning a local gloo job from Python (tests, benchmarks): N processes on one free port.

Jobs that users run go through `torchrun`; this is its in-process equivalent for code that
must start and check a small job itself.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, threads: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> None:
    """Runs fn(rank, world, *args) in `world` fresh processes joined in a gloo process group.

    `fn` must be importable (a module-level function). Raises if any process fails.
    """
    mp.start_processes(_entry, args=(fn, world, free_port(), threads, args), nprocs=world, join=True,
                       start_method="spawn")
