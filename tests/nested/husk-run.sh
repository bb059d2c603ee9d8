#!/bin/sh
# Inside the emulated test host: `husk run` of a busybox bundle through the built-in VMM, the
# whole path (boot, vsock, virtio-fs rootfs, stdin, exit codes, teardown) in two runs:
#   c1: --hypervisor kvm --vcpus 2, reads a line from stdin, prints it, the kernel release and
#       the number of CPUs the container sees (the MP table's), exits 3;
#   c2: --hypervisor auto (must pick the built-in VMM here), SIGTERM to husk once the container
#       runs: forwarded, ignored by the container's PID 1, SIGKILL after the grace: 137;
#   c3: the rootfs as an ext4 disk image (virtio-blk): the container writes to it, and the image
#       is clean afterwards (`FSCK <status>`).
# Prints one `HUSK-RUN <id> EXIT <code> WALL-MS <ms>` line per run and `LEFT-BEHIND [...]`.
# Usage: husk-run.sh HUSK
husk=$1
bundle=/run/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/sys" "$bundle/rootfs/dev"
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
ln -s busybox "$bundle/rootfs/bin/uname"
ln -s busybox "$bundle/rootfs/bin/sleep"
ln -s busybox "$bundle/rootfs/bin/nproc"
ln -s busybox "$bundle/rootfs/bin/grep"
ln -s busybox "$bundle/rootfs/bin/cat"
"$husk" spec --bundle "$bundle" || exit 11
cp "$bundle/config.json" /run/config.json
"$husk" check

# One `JAIL ...` line: the confinement of the running VM's husk-vmm (its capabilities,
# no_new_privs, seccomp mode, and which namespaces it does not share with this shell).
jail_report() {
    for p in $(pgrep -x husk-vmm); do
        case "$(tr '\0' '\n' < /proc/$p/cmdline | sed -n 2p)" in --config|--kernel) ;; *) continue ;; esac
        line=$(grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/$p/status | tr -s '\t\n' '  ')
        line=${line% }
        for n in mnt pid ipc uts net; do
            [ "$(readlink /proc/$p/ns/$n)" != "$(readlink /proc/self/ns/$n)" ] && line="$line own-$n"
        done
        echo "JAIL $line"
    done
}

# run ID HYPERVISOR SCRIPT [SIGNAL]: husk run (with $flags) with a watchdog that shows the logs of a hang (console,
# VMM, virtiofsd) before it ends husk; stdin comes from the caller.
run() {
    sed "s|\"sh\"$|\"sh\", \"-c\", \"$3\"|" /run/config.json > "$bundle/config.json"
    start=$(date +%s%N)
    # A background command's stdin is /dev/null unless redirected explicitly: hand it over.
    exec 3<&0
    "$husk" --debug --root /run/husk run --hypervisor "$2" $flags --timings --bundle "$bundle" "$1" <&3 &
    pid=$!
    ( sleep 60; kill -0 $pid 2>/dev/null || exit 0
      for f in $(find /run/husk /run/tmp -name '*.log' 2>/dev/null); do echo "== $f"; tail -n 30 "$f"; done
      kill $pid ) &
    watchdog=$!
    if [ -n "$4" ]; then
        # Once the container printed "running", signal husk.
        until grep -q running /run/out 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
        jail_report
        kill -$4 $pid
    fi
    wait $pid
    status=$?
    kill $watchdog 2>/dev/null
    end=$(date +%s%N)
    echo "HUSK-RUN $1 EXIT $status WALL-MS $(( (end - start) / 1000000 ))"
}

flags="--vcpus 2"
echo "from-host-stdin" | run c1 kvm 'read line; echo built-in VMM: kernel $(uname -r) stdin=$line cpus=$(nproc); exit 3'
flags=
run c2 auto 'echo running; sleep 600' TERM < /dev/null > /run/out
cat /run/out

mkfs.ext4 -q -F -d "$bundle/rootfs" /run/rootfs.img 16M || exit 12
sed 's|"path": "rootfs"|"path": "/run/rootfs.img"|; s|"readonly": true|"readonly": false|' /run/config.json > /run/config-disk.json
cp /run/config-disk.json /run/config.json
run c3 kvm 'grep ^/dev/vda /proc/mounts; echo disk-ok > /f; cat /f' < /dev/null
e2fsck -fn /run/rootfs.img > /dev/null 2>&1
echo "FSCK $?"
left=$(ls -A /run/husk 2>/dev/null)
echo "LEFT-BEHIND [$left]"
[ -z "$left" ]
