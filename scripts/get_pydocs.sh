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
bash "$(dirname "${BASH_SOURCE[0]}")/unpack_debian_package.sh" "$package" "$dest" pydocs \
  "elsewhere set LORAP_PYDOCS_DIR to a copy"
echo "[pydocs] $package $(cat "$dest/VERSION") unpacked into $dest" >&2
