#!/bin/sh
# Inside the emulated test host: `husk run` of a busybox bundle through the built-in VMM, the
# whole path (boot, vsock, virtio-fs rootfs, virtio-blk, virtio-net, stdin, exit codes,
# teardown) in four runs:
#   c1: --hypervisor kvm --vcpus 2, reads a line from stdin, prints it, the kernel release and
#       the number of CPUs the container sees (the MP table's), exits 3;
#   c2: --hypervisor auto (must pick the built-in VMM here), SIGTERM to husk once the container
#       runs: forwarded, ignored by the container's PID 1, SIGKILL after the grace: 137;
#   c3: the rootfs as an ext4 disk image (virtio-blk): the container writes to it, and the image
#       is clean afterwards (`FSCK <status>`);
#   c4: --hypervisor auto with a network namespace by path, as Podman gives one (a veth pair:
#       the test host at 10.77.0.1 serves files with busybox httpd, the namespace's end is
#       10.77.0.2/24, MTU 9000): the built-in VMM's virtio-net device carries it; the container
#       prints its address and MTU (`NET-ADDR`, `NET-MTU`), fetches a small file with wget
#       (`NET-GOT`) and nc (`NET-NC`, the count of lines with its text), and the MD5 of a 3 MB
#       one in jumbo frames (`NET-BIG`, the host's own being `NET-BIG-HOST`);
#       `NET-TAP-LEFT` counts the taps left in the namespace afterwards.
#   s1-s4 (`snapshot`, a nest of its own): boot snapshots. s1 is the first VM of its shape: a
#       VM is booted and saved, then s1 restored from it; s2 is restored and fills 32 MiB of
#       its memory; s3 boots cold (--no-snapshot); s4 finds the snapshot truncated and boots
#       cold. Each prints its boot id and 16 random bytes (`ID <run> <boot id> <bytes>`); the
#       snapshot's mode and MD5 before and after s2 are `SNAP-MODE`, `SNAP-MD5-BEFORE`,
#       `SNAP-MD5-AFTER`.
# Prints one `HUSK-RUN <id> EXIT <code> WALL-MS <ms>` line per run and `LEFT-BEHIND [...]`.
# Usage: husk-run.sh HUSK [net|snapshot]: c1, c2 and c3, or c4 alone, or s1-s4 alone (nests of
# their own, each short: TCG emulating nested SVM wedges now and then, and a nest that hangs
# is booted again).
husk=$1
only=$2
bundle=/run/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/sys" "$bundle/rootfs/dev"
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
ln -s busybox "$bundle/rootfs/bin/uname"
ln -s busybox "$bundle/rootfs/bin/sleep"
ln -s busybox "$bundle/rootfs/bin/nproc"
ln -s busybox "$bundle/rootfs/bin/grep"
ln -s busybox "$bundle/rootfs/bin/cat"
ln -s busybox "$bundle/rootfs/bin/ip"
ln -s busybox "$bundle/rootfs/bin/wget"
ln -s busybox "$bundle/rootfs/bin/nc"
ln -s busybox "$bundle/rootfs/bin/printf"
ln -s busybox "$bundle/rootfs/bin/md5sum"
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

if [ "$only" = snapshot ]; then
for tool in head od tr dd; do ln -s busybox "$bundle/rootfs/bin/$tool"; done
cat > "$bundle/rootfs/ident" <<'EOS'
echo ID $1 $(cat /proc/sys/kernel/random/boot_id) $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
EOS
flags=
run s1 kvm 'sh /ident s1' < /dev/null
snap=$(ls -d /run/husk-snapshots/*/ | head -n 1)
echo "SNAP-MODE $(stat -c %a "$snap/memory") $(stat -c %a "$snap")"
echo "SNAP-SIZE-KIB $(du -k "$snap/memory" | cut -f1) of $(( $(stat -c %s "$snap/memory") / 1024 ))"
echo "SNAP-MD5-BEFORE $(md5sum < "$snap/memory")"
run s2 kvm 'sh /ident s2; dd if=/dev/zero of=/dev/fill bs=1M count=32 2>/dev/null; echo FILLED' < /dev/null
echo "SNAP-MD5-AFTER $(md5sum < "$snap/memory")"
flags=--no-snapshot
run s3 kvm 'sh /ident s3' < /dev/null
flags=
truncate -s 4096 "$snap/memory"
run s4 kvm 'sh /ident s4' < /dev/null
fi

if [ "$only" != net ] && [ "$only" != snapshot ]; then
flags="--vcpus 2"
echo "from-host-stdin" | run c1 kvm 'read line; echo built-in VMM: kernel $(uname -r) stdin=$line cpus=$(nproc); exit 3'
flags=
run c2 auto 'echo running; sleep 600' TERM < /dev/null > /run/out
cat /run/out
fi

if [ "$only" = net ]; then
# The test host's own loopback: busybox httpd answers on 10.77.0.1 from here too.
ip link set lo up
ip netns add n1 || exit 13
ip link add h0 type veth peer name c0 netns n1 || exit 14
ip addr add 10.77.0.1/24 dev h0 && ip link set h0 mtu 9000 up || exit 15
ip -n n1 addr add 10.77.0.2/24 dev c0 && ip -n n1 link set c0 mtu 9000 up && ip -n n1 link set lo up || exit 16
mkdir -p /run/www && echo net-ok > /run/www/f
head -c 3000000 /dev/urandom > /run/www/big
echo "NET-BIG-HOST $(md5sum < /run/www/big)"

busybox httpd -p 10.77.0.1:8080 -h /run/www || exit 17
sed 's|"type": "network"|"type": "network", "path": "/run/netns/n1"|' /run/config.json > /run/config-net.json
cp /run/config.json /run/config-dir.json
cp /run/config-net.json /run/config.json
cat > "$bundle/rootfs/netcheck" <<'EOS'
echo NET-ADDR $(ip -4 -o addr show dev eth0)
echo NET-MTU $(cat /sys/class/net/eth0/mtu)
echo NET-GOT $(wget -O - http://10.77.0.1:8080/f)
echo NET-NC $(printf 'GET /f HTTP/1.0\r\n\r\n' | nc 10.77.0.1 8080 | grep -c net-ok)
echo NET-BIG $(wget -q -O - http://10.77.0.1:8080/big | md5sum)
EOS
run c4 auto 'sh /netcheck' < /dev/null
cp /run/config-dir.json /run/config.json
echo "NET-TAP-LEFT $(ip -n n1 -o link show type tun | wc -l)"
fi

if [ "$only" != net ] && [ "$only" != snapshot ]; then
mkfs.ext4 -q -F -d "$bundle/rootfs" /run/rootfs.img 16M || exit 12
sed 's|"path": "rootfs"|"path": "/run/rootfs.img"|; s|"readonly": true|"readonly": false|' /run/config.json > /run/config-disk.json
cp /run/config-disk.json /run/config.json
run c3 kvm 'grep ^/dev/vda /proc/mounts; echo disk-ok > /f; cat /f' < /dev/null
e2fsck -fn /run/rootfs.img > /dev/null 2>&1
echo "FSCK $?"
fi
left=$(ls -A /run/husk 2>/dev/null)
echo "LEFT-BEHIND [$left]"
[ -z "$left" ]
