"""What every report records about where its numbers came from."""
import datetime
import platform


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(device: str | None = None) -> dict:
    import torch

    from . import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "lorap": __version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "lm_eval": _version("lm-eval") or _version("lm_eval"),
            "python": platform.python_version(),
        },
        "device": {"type": str(device), "name": device_name, "threads": torch.get_num_threads()},
    }
