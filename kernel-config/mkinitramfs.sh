#!/usr/bin/env bash
# Write the husk initramfs: husk-agent as /init, plus the few nodes and directories PID 1 needs.
#
# Usage: mkinitramfs.sh GEN_INIT_CPIO AGENT_BINARY OUT_CPIO
#   GEN_INIT_CPIO is the kernel tree's usr/gen_init_cpio (built by build-kernel.sh).
# The archive is uncompressed: the kernel unpacks it faster than it would decompress it.
set -euo pipefail

die() { printf 'mkinitramfs: error: %s\n' "$*" >&2; exit 1; }
[[ $# -eq 3 ]] || die "usage: $0 GEN_INIT_CPIO AGENT_BINARY OUT_CPIO"
gen=$1 agent=$2 out=$3
[[ -x $gen ]] || die "$gen is not an executable gen_init_cpio"
[[ -f $agent ]] || die "agent binary $agent not found"
if readelf -l "$agent" | grep -q 'Requesting program interpreter'; then
    die "$agent is dynamically linked; build it with crt-static"
fi

list=$(mktemp)
trap 'rm -f "$list" "$out.tmp"' EXIT
cat >"$list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0555 0 0
dir /sys 0555 0 0
dir /run 0755 0 0
dir /tmp 1777 0 0
dir /newroot 0755 0 0
file /init $(realpath "$agent") 0755 0 0
LIST
mkdir -p "$(dirname "$out")"
"$gen" "$list" >"$out.tmp"
mv "$out.tmp" "$out"
printf 'mkinitramfs: %s (%s bytes)\n' "$out" "$(stat -c %s "$out")" >&2
