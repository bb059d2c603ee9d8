#!/bin/sh
# PID 1 of the emulated test host: the real host's / is the root, read-only over virtio-9p.
# Mounts the basics (writable space only under /run: the host's /tmp stays visible, as the
# checkout may live there), runs the job file named by husk_job= on the kernel command line,
# prints its status and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mkdir -p /run/tmp
export TMPDIR=/run/tmp HOME=/run/tmp
sh "$husk_job"
echo "NESTED-EXIT $?"
echo o > /proc/sysrq-trigger
sleep 10
