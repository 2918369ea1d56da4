#!/usr/bin/env bash
# Unpacks the out-of-domain corpus 'pydocs' (the Python 3.11 documentation sources, Debian package
# python3.11-doc) into lorap's cache. Needs Debian's apt (the package registry) but no root: the
# package is downloaded and unpacked, never installed. Idempotent.
set -euo pipefail
package=python3.11-doc
dest="${LORAP_CACHE:-$HOME/.cache/lorap}/corpora/$package"
if [ -d "$dest/usr/share/doc/python3.11/html/_sources" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "[pydocs] needs apt-get and dpkg-deb (Debian or Ubuntu); elsewhere set LORAP_PYDOCS_DIR to a copy" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work" "$dest.partial"' EXIT
(cd "$work" && apt-get download "$package" >/dev/null 2>&1) || {
  echo "[pydocs] apt-get download $package failed (run apt-get update first?)" >&2
  exit 1
}
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
dpkg-deb -x "$work"/"$package"_*.deb "$dest.partial"
dpkg-deb -f "$work"/"$package"_*.deb Version > "$dest.partial/VERSION"
mv "$dest.partial" "$dest"
echo "[pydocs] $package $(cat "$dest/VERSION") unpacked into $dest" >&2
