#!/bin/sh
# Inside the emulated test host: boot the real husk guest with the built-in VMM on this
# host's /dev/kvm, wait for husk-agent over the VMM's own vsock device, power it off.
# Usage: vmm-boot.sh HUSK_VMM AGENT_PING KERNEL INITRAMFS
vmm=$1 ping=$2 kernel=$3 initramfs=$4
dir=$(mktemp -d "${TMPDIR:-/tmp}/vmm.XXXXXX")
ls -l /dev/kvm || exit 10
start=$(date +%s%N)
"$vmm" --kernel "$kernel" --initramfs "$initramfs" --console "$dir/console.log" \
    --vsock-uds "$dir/vsock.sock" --timeout-secs 150 &
pid=$!
"$ping" "$dir/vsock.sock" 120
ping=$?
wait $pid
vmm_status=$?
end=$(date +%s%N)
echo "VMM-EXIT $vmm_status PING-EXIT $ping WALL-MS $(( (end - start) / 1000000 ))"
if [ $vmm_status -ne 0 ] || [ $ping -ne 0 ]; then tail -n 30 "$dir/console.log"; fi
[ $vmm_status -eq 0 ] && [ $ping -eq 0 ]
