#!/usr/bin/env bash
# The demo: a busybox-static bundle made with `husk spec`, run in a micro-VM.
# Usage: tests/demo.sh HUSK_BINARY BUNDLE_DIR
set -euo pipefail
husk=$(realpath "$1") bundle=$(realpath -m "$2")
busybox=$(command -v busybox)

rm -rf "$bundle" && mkdir -p "$bundle/rootfs/bin"
cp "$busybox" "$bundle/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$bundle/rootfs/bin/$applet" ] || ln -s busybox "$bundle/rootfs/bin/$applet"
done
mkdir -p "$bundle/rootfs/"{proc,sys,dev,tmp,etc,root}
echo "root:x:0:0:root:/root:/bin/sh" >"$bundle/rootfs/etc/passwd"
echo "root:x:0:" >"$bundle/rootfs/etc/group"
"$husk" spec --bundle "$bundle"
script='echo "container: kernel $(uname -r), hostname $(hostname), my pid $$"; echo "processes in the container:"; ps'
# Replace the default ["sh"] args and hostname with the demo's.
sed -i -e "s|\"sh\"$|\"sh\", \"-c\", \"${script//\"/\\\\\"}\"|" -e 's|"hostname": ".*"|"hostname": "husk-demo"|' "$bundle/config.json"

echo "host:      kernel $(uname -r), hostname $(hostname)"
cd "$bundle"
exec "$husk" --root "$bundle/../run" run --timings "demo-$$"
