//! The VMM's confinement (`husk_vmm::confine`), in a child process of this test binary: after
//! dropping capabilities and installing the filter the thread has no capabilities and is in
//! seccomp filter mode, the syscalls of a running VMM still work, and opening a file kills the
//! process with SIGSYS.

// An integration-test file is a crate of its own; its helpers are test code too.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "HUSK_CONFINE_TEST_CHILD";

/// Runs this test binary's test `name` again with `CHILD` set; returns its status and stdout.
fn child(name: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A /proc status file read through a handle opened before confinement.
fn status_text(file: &mut std::fs::File) -> String {
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    file.seek(SeekFrom::Start(0)).unwrap();
    while let Ok(n @ 1..) = file.read(&mut chunk) {
        text.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn test_confined_no_capabilities_seccomp_on_threads_still_run() {
    if std::env::var_os(CHILD).is_none() {
        let (status, stdout) = child("test_confined_no_capabilities_seccomp_on_threads_still_run");
        assert!(
            status.success(),
            "confined child failed: {status:?}\n{stdout}"
        );
        assert!(stdout.contains("CONFINED-OK"), "{stdout}");
        return;
    }
    // Capabilities are per thread: this test's thread is the one confined.
    let mut status = std::fs::File::open("/proc/thread-self/status").unwrap();
    husk_vmm::confine::drop_capabilities().unwrap();
    husk_vmm::confine::install_filter().unwrap();
    let text = status_text(&mut status);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned()
    };
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    assert_eq!(field("Seccomp:"), "2", "filter mode");
    assert_eq!(field("NoNewPrivs:"), "1");
    // A thread started after confinement, as the vCPU thread is, runs and joins.
    let sum = std::thread::spawn(|| (1..=10u32).sum::<u32>())
        .join()
        .unwrap();
    assert_eq!(sum, 55);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "CONFINED-OK").unwrap();
}

#[test]
fn test_confined_open_file_killed_sigsys() {
    if std::env::var_os(CHILD).is_none() {
        let (status, stdout) = child("test_confined_open_file_killed_sigsys");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stdout}");
        assert!(!stdout.contains("OPENED"), "{stdout}");
        return;
    }
    husk_vmm::confine::install_filter().unwrap();
    let opened = std::fs::File::open("/etc/hostname");
    println!("OPENED {opened:?}");
}
