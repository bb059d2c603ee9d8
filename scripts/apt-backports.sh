#!/usr/bin/env bash
# Installs Debian packages from the bookworm-backports suite, which is added to the machine's
# existing Debian source entry (the deb822 one listing plain `bookworm`), never as a new entry.
# Idempotent: quick when the suite is there and the packages are installed from it.
#
# usage: apt-backports.sh PACKAGE...
set -euo pipefail

sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || { echo "apt-backports: no $sources (a deb822 Debian entry) to add bookworm-backports to" >&2; exit 1; }
if ! grep -qE '^Suites:.*\bbookworm-backports\b' "$sources"; then
	echo "apt: enabling bookworm-backports in $sources" >&2
	sed -i -E '/^Suites:/{/(\s|:)bookworm(\s|$)/s/$/ bookworm-backports/}' "$sources"
	apt-get update -qq
fi
missing=()
for p in "$@"; do
	dpkg-query -W -f='${Version}' "$p" 2>/dev/null | grep -q 'bpo12' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "apt: installing ${missing[*]} from bookworm-backports" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	-t bookworm-backports "${missing[@]}" >/dev/null
