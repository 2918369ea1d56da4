"""Which device computes, and how much memory a run took (the one reader of /proc/self/status)."""
from contextlib import contextmanager

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


def free_memory_bytes(device) -> int | None:
    """Memory free where `device` computes: the GPU's free memory, or the host's MemAvailable
    (None where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory_bytes()


# The largest resident set seen before the last reset of the kernel's high-water mark (reset_peak_rss)
_PEAK_BEFORE_RESET_MB = 0.0


def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB, or None where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _status_mb(field: str) -> float | None:
    kib = _status_kib(field)
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current resident set, so the next peak read
    belongs to what runs from now on; False where that is not possible (not Linux). The peak before
    the reset is kept, so peak_memory() still reports the whole process's peak."""
    global _PEAK_BEFORE_RESET_MB
    peak = _status_mb("VmHWM")
    if peak is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    _PEAK_BEFORE_RESET_MB = max(_PEAK_BEFORE_RESET_MB, peak)
    return True


def phase_peak_rss_mb() -> float | None:
    """The peak resident set since the previous call (or since the process began), then a fresh start.

    Linux keeps one high-water mark per process (VmHWM); reset_peak_rss() resets it, so each phase
    of a run gets its own peak. None where that is not possible (not Linux), and then no reset
    happens. peak_memory() still reports the whole process's peak.
    """
    peak = _status_mb("VmHWM")
    if peak is None or not reset_peak_rss():
        return None
    return peak


def peak_memory(device) -> dict:
    """This process's peak resident set since it began, and the device's peak allocation on CUDA.

    Linux's VmHWM, not ru_maxrss: ru_maxrss also counts the parent's peak when a process was
    started by fork and exec (the parent's high-water mark carries over through exec), so lorap
    run from a script that had just used 3 GiB reported 3 GiB whatever it used itself.
    """
    import resource

    own = _status_mb("VmHWM")
    if own is None:  # not Linux
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = {"host_rss_mb": max(own, _PEAK_BEFORE_RESET_MB)}  # reset_peak_rss() lowers VmHWM
    if str(device).startswith("cuda"):
        memory["device_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


@contextmanager
def peak_memory_during(device, into: dict):
    """Fill `into` with the peak memory of the block alone (where peak_memory() gives the whole
    process's): the peak allocated bytes on CUDA, the peak resident set on the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        into.update(kind="cuda peak allocated", before_bytes=before, peak_bytes=torch.cuda.max_memory_allocated(device))
        return
    reset = reset_peak_rss()
    before = _status_kib("VmRSS")
    yield
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        into.update(kind="unavailable (no /proc on this system)")
        return
    into.update(
        kind="process RSS" if reset else "process RSS (peak since process start: could not reset)",
        before_bytes=before * 1024,
        peak_bytes=peak * 1024,
    )


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS. Without this, glibc keeps the fragments of every freed
    layer and the resident set grows by a fraction of a layer per layer (measured: about 16 MiB per
    layer of 54 MB), which defeats streaming."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
