#!/bin/sh
# `make bench` on a host whose KVM runs Linux guests (the emulated test host here, or the real
# host where it passes the probe): hello-world `husk run` through the built-in VMM restored
# from its boot snapshot (made by a first run, not counted), through the built-in VMM booting
# cold (--no-snapshot) and through the QEMU door (on the same KVM), then husk-vmm alone booting
# the guest to its agent with --report. Prints one line per run:
#   BENCH door=kvm|kvm-cold|qemu wall_ms=N boot_to_agent_ms=N container_start_ms=N total_ms=N
#   BENCH-VMM ping_exit=N handshake_ms=N {husk-vmm report JSON}
# Usage: bench.sh HUSK HUSK_VMM AGENT_PING KERNEL INITRAMFS RUNS
husk=$1 vmm=$2 ping=$3 kernel=$4 initramfs=$5 runs=$6
work=$(mktemp -d "${TMPDIR:-/tmp}/bench.XXXXXX")
bundle=$work/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/sys" "$bundle/rootfs/dev"
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
ln -s busybox "$bundle/rootfs/bin/echo"
"$husk" spec --bundle "$bundle" || exit 11
sed -i 's|"sh"$|"echo", "hello"|' "$bundle/config.json"
"$husk" --root "$work/root" run --hypervisor kvm --bundle "$bundle" warm > /dev/null 2>&1
i=0
while [ $i -lt "$runs" ]; do
    i=$((i + 1))
    for door in kvm kvm-cold qemu; do
        case $door in
            kvm-cold) flags="--hypervisor kvm --no-snapshot" ;;
            *) flags="--hypervisor $door" ;;
        esac
        start=$(date +%s%N)
        timings=$("$husk" --root "$work/root" run $flags --timings --bundle "$bundle" "b$i$door" 2>&1 >/dev/null)
        status=$?
        end=$(date +%s%N)
        [ $status -eq 0 ] || { echo "BENCH-FAILED door=$door status=$status $timings"; exit 1; }
        echo "BENCH door=$door wall_ms=$(( (end - start) / 1000000 )) ${timings#husk: timings: }"
    done
    "$vmm" --kernel "$kernel" --initramfs "$initramfs" --console "$work/console.log" \
        --vsock-uds "$work/vsock.sock" --timeout-secs 120 --report > "$work/report" &
    pid=$!
    handshake=$("$ping" "$work/vsock.sock" 60 | sed -n 's/^agent: handshake after \([0-9]*\) ms/\1/p')
    wait $pid
    echo "BENCH-VMM handshake_ms=$handshake $(cat "$work/report")"
done
rm -rf "$work"
