"""Files written whole or not at all."""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path` to write; it replaces `path` only if the block succeeds,
    and is removed if it fails, so `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes files private; what lorap writes is meant to be read
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
