"""The benchmarks' extra corpora, each one text file that get_debian_text.sh builds once from a
Debian package into lorap's cache: `perldoc` (Perl's documentation, a second domain to calibrate or
recover on) and `fortunes` (quotations, jokes and verse, a judge nothing trains on)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "get_debian_text.sh"


def debian_text(name: str) -> str:
    """The path of corpus `name`'s text file, fetched first if it is not there yet."""
    return subprocess.run(["bash", str(SCRIPT), name], check=True, capture_output=True, text=True).stdout.strip()
