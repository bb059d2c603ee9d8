# husk: entry points only. Everything a fresh Debian 12 machine needs is installed by `deps`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

OUT       := $(CURDIR)/out
SHARE     := $(OUT)/share/husk
HOST_TRIPLE := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(HOST_TRIPLE)/agent/husk-agent
DEMO      := $(CURDIR)/build/demo-bundle

# What `make demo` needs: the guest kernel's source and build tools, QEMU, busybox for the demo's
# bundle, libseccomp and libcap-ng for virtiofsd's build, iproute2 for engines' networks.
# QEMU comes from bookworm-backports (BACKPORT_PACKAGES): Debian 12's QEMU 7.2 cannot save a VM
# with virtio-fs, so its VMs could not start from a boot snapshot.
BACKPORT_PACKAGES := qemu-system-x86 qemu-system-common qemu-system-data
DEMO_PACKAGES := linux-source-6.12 build-essential flex bison bc libelf-dev \
	libssl-dev cpio xz-utils busybox-static libseccomp-dev libcap-ng-dev pkg-config iproute2
# What the tests add: runc (the oracle), e2fsprogs (disk images), containerd and CNI plugins,
# protobuf-compiler (the CRI tests' client), Docker and Podman.
TEST_PACKAGES := runc e2fsprogs containerd containernetworking-plugins protobuf-compiler \
	docker.io podman
export PATH := /usr/local/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps test-deps apt build husk agent kernel test-host-kernel initramfs demo test test-unit test-e2e conformance fuzz bench fmt lint clean

all: build

## deps: what building and the demo need: Debian packages and virtiofsd (idempotent; quick when
## all is there); test-deps: and what the tests need: more packages and cargo-fuzz
deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(DEMO_PACKAGES)"
	@scripts/apt-backports.sh $(BACKPORT_PACKAGES)
	@command -v virtiofsd >/dev/null || { echo "cargo: installing virtiofsd"; \
		cargo install --quiet --locked --root /usr/local virtiofsd; }

test-deps: deps
	@$(MAKE) --no-print-directory apt PACKAGES="$(TEST_PACKAGES)"
	@command -v cargo-fuzz >/dev/null || { echo "cargo: installing cargo-fuzz"; \
		cargo install --quiet --locked cargo-fuzz; }

apt:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## build: husk, husk-vmm, the shim, the static agent, the guest kernel and the initramfs, into
## out/ (the emulated test host's kernel, for the built-in VMM's end-to-end tests, is
## test-host-kernel: the tests and benches build it)
build: husk initramfs

husk:
	cargo build --release -p husk-cli -p husk-vmm -p husk-shim
	install -D -m 0755 target/release/husk $(OUT)/bin/husk
	install -D -m 0755 target/release/husk-vmm $(OUT)/bin/husk-vmm
	install -D -m 0755 target/release/containerd-shim-husk-v2 $(OUT)/bin/containerd-shim-husk-v2

agent:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile agent -p husk-agent --target $(HOST_TRIPLE)

kernel:
	kernel-config/build-kernel.sh $(SHARE)

test-host-kernel:
	kernel-config/build-kernel.sh $(SHARE) kernel-config/test-host test-host

initramfs: agent kernel
	kernel-config/mkinitramfs.sh $(SHARE)/gen_init_cpio $(AGENT_BIN) $(SHARE)/initramfs.cpio

## demo: a busybox container in a micro-VM
demo: deps build
	tests/demo.sh $(OUT)/bin/husk $(DEMO)

## test: every test (unit and end-to-end through real guests)
test: test-deps build test-host-kernel
	HUSK_OUT=$(OUT) cargo test --workspace --no-fail-fast -- --test-threads=2

test-unit:
	cargo test --workspace --lib --bins

test-e2e: test-deps build test-host-kernel
	HUSK_OUT=$(OUT) cargo test -p husk-e2e -- --test-threads=2

## conformance: the OCI runtime-tools validation suite (58 tests; CONFORMANCE_TARBALL, default
## ../shared/conformance/runtime-tools.tar.gz) under runc and then husk, verdicts side by side, table in
## out/conformance.md; Go 1.23 from bookworm-backports and the suite's build are cached; one SKIPPED
## line where the tarball is absent; CONFORMANCE_MIN_HUSK=N fails when husk passes fewer than N
CONFORMANCE_TARBALL ?= $(abspath $(CURDIR)/../shared/conformance/runtime-tools.tar.gz)
conformance:
	@if [ ! -f "$(CONFORMANCE_TARBALL)" ]; then \
		echo "SKIPPED: conformance: no OCI runtime-tools suite at $(CONFORMANCE_TARBALL)"; exit 0; \
	fi; \
	$(MAKE) --no-print-directory test-deps build; \
	suite=$$(tests/conformance/suite.sh "$(CONFORMANCE_TARBALL)" | tail -n 1); \
	HUSK_OUT=$(OUT) cargo run --quiet -p husk-e2e --bin conformance -- "$$suite"

## fuzz: every fuzz target (fuzz/, libFuzzer) for FUZZ_SECS seconds each (default 20) from its
## committed corpus; fails on any crash
FUZZ_SECS ?= 20
fuzz: test-deps
	FUZZ_SECS=$(FUZZ_SECS) fuzz/run.sh

## bench: hello-world latency and peak host memory, husk vs runc; lifecycle (create+start, exec, state/list with 50) vs runc; built-in VMM vs QEMU; containerd shim (ctr run latency, memory per container) husk.v2 vs runc.v2; Docker and Podman (run --rm true latency, memory per container) husk vs runc; same run
bench: test-deps build test-host-kernel
	HUSK_OUT=$(OUT) cargo bench -p husk-e2e --bench run --bench lifecycle --bench vmm --bench containerd --bench engines

fmt:
	cargo fmt --all
	cargo fmt --manifest-path fuzz/Cargo.toml

lint:
	cargo fmt --all -- --check
	cargo fmt --manifest-path fuzz/Cargo.toml -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf $(OUT) build
