#!/usr/bin/env bash
# Writes a second domain for the benchmarks that calibrate or recover on two (recovery.py's
# -wiki-perl recipes, a choose_best.py candidate): Perl's documentation (Debian package perl-doc,
# the POD sources, Artistic / GPL licence), concatenated in file order into one text file. It is
# software documentation like the judge corpus `pydocs`, but another language's, and never
# Python's. Needs Debian's apt (the package registry), no root: the package is downloaded and
# unpacked, never installed. Idempotent; prints the file's path.
set -euo pipefail
package=perl-doc
dest="${LORAP_CACHE:-$HOME/.cache/lorap}/corpora/$package"
text="$dest/perldoc.txt"
if [ -s "$text" ]; then
  echo "$text"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work" "$text.partial"' EXIT
bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/unpack_debian_package.sh" "$package" "$work/unpacked" perldoc
mkdir -p "$dest"
# one document per .pod file, separated by a blank line; written aside, then moved into place
find "$work/unpacked" -name "*.pod" -type f | LC_ALL=C sort | while read -r pod; do cat "$pod"; printf '\n\n'; done > "$text.partial"
cp "$work/unpacked/VERSION" "$dest/VERSION"
mv "$text.partial" "$text"
echo "[perldoc] $package $(cat "$dest/VERSION"): $(wc -c < "$text") bytes" >&2
echo "$text"
