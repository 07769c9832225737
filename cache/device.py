"""Process-group and device helpers shared by both stages (plain ``torchrun`` environment variables), and
the description of the machine a measurement ran on (``machine_info``)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cache.util import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK; one process without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t


def resolve_device(device: str = "auto", dist: Dist | None = None) -> torch.device:
    """``auto`` is CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist is not None and dist.distributed:
        device = f"cuda:{dist.local_rank}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but CUDA is not available; use --device cpu "
                            "(or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}; "
                            "pick one of them or use --device auto")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device} requested but MPS is not available; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def machine_info() -> dict[str, Any]:
    """The machine a measurement ran on (CPU model, cores usable, torch threads and versions), as the demo's
    report and the benchmarks record it."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
