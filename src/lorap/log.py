"""Progress messages go to stderr so that stdout stays clean for tables and JSON."""
import sys


def info(message: str) -> None:
    print(f"[lorap] {message}", file=sys.stderr, flush=True)
