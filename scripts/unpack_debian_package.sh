#!/usr/bin/env bash
# unpack_debian_package.sh PACKAGE DEST [TAG [ELSEWHERE]]
# Unpacks Debian package PACKAGE into folder DEST (with its version in DEST/VERSION), for the text
# corpora that ship in Debian packages (get_pydocs.sh, benchmarks/get_debian_text.sh). Needs Debian's
# apt (the package registry) but no root: the package is downloaded and unpacked, never installed.
# DEST appears whole or not at all: the files are unpacked beside it and moved into place.
set -euo pipefail
package="$1"
dest="$2"
tag="${3:-$package}"  # how messages name the corpus
elsewhere="${4:-}"    # what to do on a machine without apt, if anything
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "[$tag] needs apt-get and dpkg-deb (Debian or Ubuntu)${elsewhere:+; $elsewhere}" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work" "$dest.partial"' EXIT
(cd "$work" && apt-get download "$package" >/dev/null 2>&1) || {
  echo "[$tag] apt-get download $package failed (run apt-get update first?)" >&2
  exit 1
}
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
dpkg-deb -x "$work"/"$package"_*.deb "$dest.partial"
dpkg-deb -f "$work"/"$package"_*.deb Version > "$dest.partial/VERSION"
mv "$dest.partial" "$dest"
