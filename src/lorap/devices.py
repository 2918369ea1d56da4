"""Which device computes, and how much memory a run took."""
import torch

from .errors import LorapError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device(default_device())
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LorapError(f"device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def available_memory_bytes() -> int | None:
    """Host memory available now (MemAvailable), or None where /proc/meminfo cannot be read."""
    from pathlib import Path

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device) -> dict:
    import resource

    memory = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith("cuda"):
        memory["device_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
