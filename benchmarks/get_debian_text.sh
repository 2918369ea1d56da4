#!/usr/bin/env bash
# get_debian_text.sh NAME: writes one of the benchmarks' extra corpora, built from a Debian package,
# as one text file in lorap's cache, and prints its path. Idempotent. Needs Debian's apt (the
# package registry), no root: the package is downloaded and unpacked, never installed.
#   perldoc   Perl's documentation (perl-doc: the POD sources, Artistic / GPL licence), one document
#             per .pod file in file order. Software documentation like the judge corpus `pydocs`,
#             but another language's and never Python's: a second domain to calibrate or recover on
#             (recovery.py's -wiki-perl recipes, a choose_best.py candidate).
#   fortunes  quotations, jokes and verse (fortunes: the cookie files on people, politics, science,
#             songs and poems and so on; those on computers, Linux, Perl and Debian are left out),
#             one document per cookie, taken in turn from each file so that the first tokens already
#             span them all. A judge that shares no domain with anything the benchmarks calibrate or
#             train on (recovery.py).
set -euo pipefail
name="${1:-}"
case "$name" in
  perldoc) package=perl-doc ;;
  fortunes) package=fortunes ;;
  *) echo "usage: get_debian_text.sh perldoc|fortunes" >&2; exit 2 ;;
esac
dest="${LORAP_CACHE:-$HOME/.cache/lorap}/corpora/$package"
text="$dest/$name.txt"
if [ -s "$text" ]; then
  echo "$text"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work" "$text.partial"' EXIT
bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/unpack_debian_package.sh" "$package" "$work/unpacked" "$name"
mkdir -p "$dest"
# the text is written aside, then moved into place
case "$name" in
  perldoc)
    find "$work/unpacked" -name "*.pod" -type f | LC_ALL=C sort | while read -r pod; do cat "$pod"; printf '\n\n'; done > "$text.partial"
    ;;
  fortunes)
    python3 - "$work/unpacked/usr/share/games/fortunes" > "$text.partial" <<'PY'
import sys
from pathlib import Path

# Every English cookie file of the package but those about computing (computers, linux,
# linuxcookie, perl, debian, knghtbrd: Debian IRC quotes), ascii-art (pictures, not text) and
# zippy (a comic strip's non sequiturs).
FILES = ["art", "cookie", "definitions", "disclaimer", "drugs", "education", "ethnic", "food", "goedel",
         "humorists", "kids", "law", "love", "magic", "medicine", "men-women", "miscellaneous", "news",
         "paradoxum", "people", "pets", "platitudes", "politics", "pratchett", "science", "songs-poems",
         "sports", "startrek", "tao", "translate-me", "wisdom", "work"]
folder = Path(sys.argv[1])
files = [[c.strip("\n") for c in (folder / f).read_text(encoding="utf-8").split("\n%\n") if c.strip("%\n")]
         for f in FILES]
longest = max(len(cookies) for cookies in files)
for turn in range(longest):
    for cookies in files:
        if turn < len(cookies):
            print(cookies[turn], end="\n\n")
PY
    ;;
esac
cp "$work/unpacked/VERSION" "$dest/VERSION"
mv "$text.partial" "$text"
echo "[$name] $package $(cat "$dest/VERSION"): $(wc -c < "$text") bytes" >&2
echo "$text"
