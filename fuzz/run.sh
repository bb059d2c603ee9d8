#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECS seconds (default 20) from a scratch copy
# of its committed corpus (corpus/<target>/, which CI never grows). Prints the executions per
# target; exits non-zero if any target crashed, leaked, timed out or ran out of memory (its
# input is then in artifacts/<target>/, reproduce with `cargo fuzz run <target> <file>`).
# Stable Rust: cargo-fuzz needs nightly flags (-Zsanitizer), which RUSTC_BOOTSTRAP allows.
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECS:-20}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in $(cargo fuzz list); do
	mkdir -p "$scratch/$target"
	cp corpus/"$target"/* "$scratch/$target/"
	log="$scratch/$target.log"
	if cargo fuzz run -O "$target" "$scratch/$target" -- -max_total_time="$secs" \
		-timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
		execs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")
		corpus=$(ls "$scratch/$target" | wc -l)
		echo "fuzz $target: ${execs:-?} executions in ${secs}s, corpus $corpus, no crash"
	else
		echo "fuzz $target: FAILED"
		grep -E -A3 "panicked|ERROR: |SUMMARY" "$log" | head -30
		grep -E -A1 "^Failing input|^Reproduce with" "$log" || true
		failed+=("$target")
	fi
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: failing targets: ${failed[*]}"
	exit 1
fi
