#!/bin/sh
# Inside the emulated test host: `husk run --hypervisor kvm` of a busybox bundle, the whole
# path through the built-in VMM (boot, vsock, virtio-fs rootfs, exit code, teardown).
# Usage: husk-run.sh HUSK
husk=$1
bundle=/run/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/sys" "$bundle/rootfs/dev"
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
ln -s busybox "$bundle/rootfs/bin/uname"
"$husk" spec --bundle "$bundle" || exit 11
sed -i 's|"sh"$|"sh", "-c", "echo built-in VMM: kernel $(uname -r); exit 3"|' "$bundle/config.json"
"$husk" check
start=$(date +%s%N)
"$husk" --debug --root /run/husk run --hypervisor kvm --timings --bundle "$bundle" c1 &
pid=$!
# A hang shows its logs (console, VMM, virtiofsd) before it is ended.
( sleep 60; kill -0 $pid 2>/dev/null || exit 0
  for f in $(find /run/husk /run/tmp -name '*.log' 2>/dev/null); do echo "== $f"; tail -n 30 "$f"; done
  kill $pid ) &
watchdog=$!
wait $pid
status=$?
kill $watchdog 2>/dev/null
end=$(date +%s%N)
echo "HUSK-RUN-EXIT $status WALL-MS $(( (end - start) / 1000000 ))"
left=$(ls -A /run/husk 2>/dev/null)
echo "LEFT-BEHIND [$left]"
[ $status -eq 3 ] && [ -z "$left" ]
