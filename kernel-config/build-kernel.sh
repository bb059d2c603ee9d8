#!/usr/bin/env bash
# Build the husk guest kernel: tinyconfig + fragments/*.config, from Debian's linux-source-6.12.
#
# Usage: build-kernel.sh OUT_DIR [FRAGMENT_DIR NAME]
#   Writes OUT_DIR/vmlinux (PVH-bootable ELF) and OUT_DIR/gen_init_cpio (host tool); with a
#   FRAGMENT_DIR (default: fragments/) and NAME, writes OUT_DIR/NAME-vmlinux instead (the
#   emulated test host's kernel: test-host/ test-host).
#
# The result is cached in ${HUSK_CACHE:-$HOME/.cache/husk}/kernel-<hash>/, where <hash> covers
# the fragments, this script, the linux-source package version and the compiler version; a
# second call with the same inputs only copies the cached files.
# Environment: HUSK_CACHE (cache root), HUSK_KERNEL_JOBS (make -j, default nproc).
set -euo pipefail

SRC_PKG=linux-source-6.12
SRC_TARBALL=/usr/src/${SRC_PKG}.tar.xz

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragments_dir=$here/fragments
name=""

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 || $# -eq 3 ]] || die "usage: $0 OUT_DIR [FRAGMENT_DIR NAME]"
out_dir=$1
if [[ $# -eq 3 ]]; then
    fragments_dir=$(cd "$2" && pwd)
    name=$3
fi

[[ -r $SRC_TARBALL ]] || die "$SRC_TARBALL not found: apt-get install $SRC_PKG"
src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null) ||
    die "package $SRC_PKG is not installed"
shopt -s nullglob
fragments=("$fragments_dir"/*.config)
shopt -u nullglob
[[ ${#fragments[@]} -gt 0 ]] || die "no fragments in $fragments_dir"

cache_root=${HUSK_CACHE:-$HOME/.cache/husk}
jobs=${HUSK_KERNEL_JOBS:-$(nproc)}

# Hash every input that changes the output.
inputs_hash() {
    {
        printf 'source %s %s %s\n' "$SRC_PKG" "$src_version" "$name"
        printf 'cc %s\n' "$(${CC:-gcc} --version | head -n1)"
        sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
        for f in "${fragments[@]}"; do
            printf 'fragment %s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -c1-16
}

install_outputs() {
    mkdir -p "$out_dir"
    if [[ -n $name ]]; then
        cp -f "$1/vmlinux" "$out_dir/$name-vmlinux"
        log "$name-vmlinux -> $out_dir"
        return
    fi
    cp -f "$1/vmlinux" "$out_dir/vmlinux"
    cp -f "$1/gen_init_cpio" "$out_dir/gen_init_cpio"
    log "vmlinux and gen_init_cpio -> $out_dir"
}

# Extract the source once per package version, atomically.
extract_source() {
    local dest=$cache_root/src/$SRC_PKG-$src_version
    if [[ ! -f $dest/.husk-extracted ]]; then
        log "extracting $SRC_TARBALL (once)"
        rm -rf "$dest" "$dest.tmp"
        mkdir -p "$dest.tmp"
        tar -xf "$SRC_TARBALL" -C "$dest.tmp" --strip-components=1
        touch "$dest.tmp/.husk-extracted"
        mv "$dest.tmp" "$dest"
    fi
    printf '%s\n' "$dest"
}

# Print "CONFIG_X=value" for every option a fragment sets ("n" for "is not set"), with its file.
requested_options() {
    local f
    for f in "${fragments[@]}"; do
        sed -n -e 's/^\(CONFIG_[A-Za-z0-9_]*=.*\)$/\1/p' \
            -e 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1=n/p' "$f" |
            sed "s|\$| $(basename "$f")|"
    done
}

# Fail naming each requested option whose value is not in the final .config.
check_config() {
    local config=$1 line opt want file have missing=0
    while read -r line file; do
        opt=${line%%=*}
        want=${line#*=}
        have=$(sed -n -e "s/^$opt=\(.*\)\$/\1/p" -e "s/^# $opt is not set\$/n/p" "$config")
        [[ -n $have ]] || have=n
        [[ $have == "$want" ]] && continue
        if [[ $want == n ]]; then
            log "warning: $opt is disabled in $file but is $have (selected by another option)"
        else
            log "error: $opt=$want requested in fragments/$file, but final .config has" \
                "$([[ $have == n ]] && echo 'it absent/not set' || echo "$opt=$have")"
            missing=$((missing + 1))
        fi
    done < <(requested_options)
    [[ $missing -eq 0 ]] ||
        die "$missing requested option(s) missing from the final .config (unmet dependency or typo)"
}

configure() {
    local src=$1 build=$2
    log "configuring: tinyconfig + ${#fragments[@]} fragments"
    make -s -C "$src" O="$build" ARCH=x86_64 tinyconfig >/dev/null
    (cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m -Q -O "$build" \
        "$build/.config" "${fragments[@]}" >/dev/null)
    make -s -C "$src" O="$build" ARCH=x86_64 olddefconfig >/dev/null
    check_config "$build/.config"
}

compile() {
    local src=$1 build=$2 logfile=$2/build.log
    log "compiling vmlinux with -j$jobs (log: $logfile)"
    if ! make -C "$src" O="$build" ARCH=x86_64 -j"$jobs" vmlinux >"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "kernel build failed, full log: $logfile"
    fi
    # The initramfs writer, a single C file of the kernel tree (host tool).
    ${HOSTCC:-gcc} -O2 -o "$build/gen_init_cpio" "$src/usr/gen_init_cpio.c"
}

main() {
    local hash dest src build
    hash=$(inputs_hash)
    dest=$cache_root/kernel-$hash
    if [[ -f $dest/vmlinux && -f $dest/gen_init_cpio ]]; then
        log "cached: $dest"
        install_outputs "$dest"
        return
    fi
    mkdir -p "$cache_root"
    # One build at a time per cache; the shared work tree makes rebuilds incremental.
    exec 9>"$cache_root/kernel-build.lock"
    flock 9
    if [[ ! -f $dest/vmlinux ]]; then
        src=$(extract_source)
        build=$cache_root/kernel-build-$SRC_PKG-$src_version${name:+-$name}
        mkdir -p "$build"
        configure "$src" "$build"
        compile "$src" "$build"
        rm -rf "$dest.tmp"
        mkdir -p "$dest.tmp"
        cp "$build/vmlinux" "$build/gen_init_cpio" "$build/.config" "$dest.tmp/"
        rm -rf "$dest"
        mv "$dest.tmp" "$dest"
        log "built: $dest ($(stat -c %s "$dest/vmlinux") bytes vmlinux)"
    fi
    install_outputs "$dest"
}

main
