"""Decide quickly whether the Hugging Face hub can be reached.

Without this check, transformers and datasets retry for minutes on a machine with no
network before failing; lorap asks once, with a short timeout, and says so plainly.
"""
import functools
import os
import socket

HUB_HOST = "huggingface.co"


def _env_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "LORAP_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if _env_offline():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def force_offline() -> None:
    """Tell the HF libraries not to try the network (no slow retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_reachable.cache_clear()
