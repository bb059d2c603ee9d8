//! Bounded host resources: a guest that floods its serial console does not fill the host.
//!
//! Scenario: a container given `CAP_MKNOD` makes the guest's `/dev/ttyS0` node (the 8250 the
//! VMM emulates, whose output the door writes to `console.log` in the run directory, host RAM)
//! and writes to it for up to 20 s, at most ~8 MB; then a last marker line. The issue's test
//! writes 10 GiB; under TCG emulation the serial port moves well under 1 MB/s, so this writes
//! what it can in 20 s and checks that it was several times the cap. While it runs the host
//! console file is sampled: it never exceeds the cap plus what the guest writes between two
//! of the cap's polls, and at the end the marker, the newest output, is still there.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;
use std::time::{Duration, Instant};

use husk_e2e::harness::{show, stderr, stdout, unique, Env, TestBundle};

/// The console file's cap (husk_vmm::console::CONSOLE_CAP).
const CAP: u64 = 1 << 20;
/// What the guest may write beyond the cap between two polls of the QEMU door's watcher
/// (50 ms), generously.
const SLACK: u64 = 1 << 20;
/// One chunk the container writes: 1024 lines of 48 bytes (49 on the wire with the tty's
/// `\r`).
const CHUNK_BYTES: u64 = 1024 * 48;

/// The container's script: make the serial port's node, flood it, print the chunk count.
const FLOOD: &str = r#"set -e
mknod /dev/ttyS0 c 4 64
exec 3>/dev/ttyS0
line=husk-flood-0123456789abcdefghijklmnopqrstuvwxyz
chunk=$(i=0; while [ $i -lt 1024 ]; do echo $line; i=$((i+1)); done)
n=0
end=$(( $(date +%s) + 20 ))
while [ $(date +%s) -lt $end ] && [ $n -lt 160 ]; do echo "$chunk" >&3; n=$((n+1)); done
echo "husk-flood-done $n" >&3
echo "$n"
sleep 3
"#;

/// The last bytes of `path` (empty when missing).
fn tail(path: &Path, bytes: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let from = data.len().saturating_sub(bytes);
    String::from_utf8_lossy(data.get(from..).unwrap_or_default()).into_owned()
}

#[test]
fn test_console_flood_host_file_capped_newest_kept() {
    let Some(env) = Env::get("test_console_flood_host_file_capped_newest_kept") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", FLOOD]);
    bundle.edit(|c| {
        let caps = &mut c["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            if let Some(list) = caps[set].as_array_mut() {
                list.push("CAP_MKNOD".into());
            }
        }
    });
    let id = unique("flood");
    let console = husk_sandbox::vm_dir(&husk.root().join(&id)).join("console.log");
    let mut child = husk.spawn_run(&bundle, &id, &[]);
    drop(child.stdin.take());

    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut largest, mut at_marker) = (0u64, None);
    while Instant::now() < deadline && child.try_wait().expect("wait").is_none() {
        let size = std::fs::metadata(&console).map_or(0, |m| m.len());
        largest = largest.max(size);
        if at_marker.is_none() && tail(&console, 4096).contains("husk-flood-done") {
            // Let the watcher have one more look, then read what is kept.
            std::thread::sleep(Duration::from_millis(200));
            at_marker = Some(std::fs::read(&console).expect("console"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("husk run");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let chunks: u64 = stdout(&out).trim().parse().expect("chunk count");
    let written = chunks * CHUNK_BYTES;
    println!(
        "host_limits: guest wrote {written} bytes to its console, host file at most {largest}"
    );
    assert!(
        written > 2 * (CAP + SLACK),
        "the guest wrote only {written} bytes: the cap was not exercised; {}",
        stderr(&out)
    );
    assert!(
        largest <= CAP + SLACK,
        "console file reached {largest} bytes (cap {CAP})"
    );
    let kept = at_marker.expect("the marker never reached the console file");
    assert!(
        kept.len() as u64 <= CAP + SLACK,
        "{} bytes kept",
        kept.len()
    );
    let kept = String::from_utf8_lossy(&kept);
    assert!(
        kept.contains(&format!("husk-flood-done {chunks}")),
        "the newest line is missing from the kept console: ...{:?}",
        kept.get(kept.len().saturating_sub(300)..)
            .unwrap_or_default()
    );
    husk.assert_clean();
}
