#!/usr/bin/env bash
# Quotations, jokes and verse as one text file in lorap's cache; prints its path (see get_debian_text.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/get_debian_text.sh" fortunes
