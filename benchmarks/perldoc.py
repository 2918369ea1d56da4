"""Perl's documentation as one text file, the second domain of the benchmarks that calibrate or
recover on two (get_perldoc.sh fetches it once into lorap's cache)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "get_perldoc.sh"


def perldoc_text() -> str:
    """The file's path, fetched first if it is not there yet."""
    return subprocess.run(["bash", str(SCRIPT)], check=True, capture_output=True, text=True).stdout.strip()
