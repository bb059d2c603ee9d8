#!/usr/bin/env bash
# Prepares the OCI runtime-tools validation suite for `make conformance`: installs Go 1.23 from
# Debian's bookworm-backports suite when no Go >= 1.21 is there, then unpacks and builds the suite
# once per tarball into a cache outside the source tree. Prints the suite's source root (where
# the tests must run from) as its last stdout line. Idempotent; quick when all is there.
#
# usage: suite.sh TARBALL [CACHE_DIR]    (CACHE_DIR default: ~/.cache/husk/conformance)
set -euo pipefail

tarball=$1
cache=${2:-$HOME/.cache/husk/conformance}
go_bin=/usr/lib/go-1.23/bin

# Go >= 1.21: Debian 12's own 1.19 fails on the vendored `slices` package; it comes from the
# bookworm-backports suite (scripts/apt-backports.sh).
install_go() {
	[ -x "$go_bin/go" ] && return
	"$(dirname "${BASH_SOURCE[0]}")/../../scripts/apt-backports.sh" golang-1.23-go
}

# The suite is built once per tarball: its cache folder is named by the tarball's hash, and a
# `.built` stamp marks a finished build (a half-built folder is rebuilt from scratch).
build_suite() {
	local sum dir
	sum=$(sha256sum "$tarball" | cut -c1-16)
	dir=$cache/$sum
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9 # another checkout building the same suite
	if [ ! -f "$dir/.built" ]; then
		echo "conformance: building the suite into $dir" >&2
		rm -rf "$dir"
		mkdir -p "$dir"
		tar -xzf "$tarball" -C "$dir"
		(cd "$dir/runtime-tools" &&
			PATH=$go_bin:$PATH GOFLAGS=-mod=vendor GOCACHE=$cache/go-build \
				make runtimetest validation-executables >"$dir/build.log" 2>&1) ||
			{ echo "conformance: suite build failed, see $dir/build.log" >&2; tail -20 "$dir/build.log" >&2; exit 1; }
		touch "$dir/.built"
	fi
	echo "$dir/runtime-tools"
}

install_go
build_suite
