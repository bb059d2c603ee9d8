#!/bin/sh
# PID 1 of the emulated test host (see run-nested.sh): the real host's / is the root, read-only
# over virtio-9p. Mounts the basics, runs "$@", prints its status, powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
"$@"
echo "NESTED-EXIT $?"
echo o > /proc/sysrq-trigger
sleep 10
