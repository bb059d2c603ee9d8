//! Tiny guest payloads on this host's KVM, through the whole VM: memory, vCPU setup, buses and
//! legacy devices. Skipped (one SKIPPED line) where /dev/kvm is missing. Payloads too large to
//! write as bytes are freestanding C in `tests/payloads/`, compiled by the test that runs them
//! (skipped, one SKIPPED line, without gcc and ld).

// An integration-test file is a crate of its own; its helpers are test code too.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_devices::{VirtioMmioDevice, VsockConfig, VsockMmio};
use husk_vmm::{CpuMode, Entry, ExitReason, RestoreConfig, Vm, VmConfig};

/// A console that keeps what the guest printed.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: /dev/kvm is not available on this host");
    }
    ok
}

fn run(code: &[u8], mode: CpuMode) -> (ExitReason, String) {
    run_for(code, mode, Duration::from_secs(10))
}

fn run_for(code: &[u8], mode: CpuMode, timeout: Duration) -> (ExitReason, String) {
    run_with(code, mode, timeout, Vec::new())
}

fn run_with(
    code: &[u8],
    mode: CpuMode,
    timeout: Duration,
    virtio: Vec<Box<dyn VirtioMmioDevice>>,
) -> (ExitReason, String) {
    let console = Console::default();
    let config = VmConfig {
        memory_mib: 16,
        irqchip: false,
        console: Box::new(console.clone()),
        virtio,
        // Real mode: the IP is 16 bits wide, so the code sits in the first 64 KiB.
        entry: Entry::Payload {
            code: code.to_vec(),
            addr: if mode == CpuMode::Real {
                0x1000
            } else {
                0x1_0000
            },
            mode,
        },
    };
    let reason = Vm::new(config).expect("vm").run(timeout).expect("run");
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    (reason, out)
}

/// `mov dx, port` (with an operand-size prefix in 64-bit mode), `mov al, byte`, `out dx, al`.
fn out_byte(code: &mut Vec<u8>, long: bool, port: u16, byte: u8) {
    if long {
        code.push(0x66);
    }
    code.push(0xba);
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xb0, byte, 0xee]);
}

#[test]
fn test_payload_real_mode_serial_then_debug_exit() {
    if !kvm_available("test_payload_real_mode_serial_then_debug_exit") {
        return;
    }
    let mut code = Vec::new();
    for b in *b"hi\n" {
        out_byte(&mut code, false, 0x3f8, b);
    }
    out_byte(&mut code, false, 0x501, 42);
    code.push(0xf4);
    let (reason, out) = run(&code, CpuMode::Real);
    assert_eq!(reason, ExitReason::DebugExit(42));
    assert_eq!(out, "hi\n");
}

#[test]
fn test_payload_long_mode_64bit_register_reaches_serial() {
    if !kvm_available("test_payload_long_mode_64bit_register_reaches_serial") {
        return;
    }
    // movabs rax, 0x4100_0000_0000_0000; shr rax, 56 ('A' = 0x41 only if 64-bit decoding
    // and registers are in effect); mov dx, 0x3f8; out dx, al.
    let mut code = vec![
        0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0x41, 0x48, 0xc1, 0xe8, 0x38,
    ];
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    out_byte(&mut code, true, 0x501, 7);
    let (reason, out) = run(&code, CpuMode::Long);
    assert_eq!(reason, ExitReason::DebugExit(7));
    assert_eq!(out, "A");
}

#[test]
fn test_payload_i8042_reset_ends_vm_as_reset() {
    if !kvm_available("test_payload_i8042_reset_ends_vm_as_reset") {
        return;
    }
    let mut code = Vec::new();
    out_byte(&mut code, false, 0x64, 0xfe);
    out_byte(&mut code, false, 0x501, 1);
    let (reason, _) = run(&code, CpuMode::Real);
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
fn test_payload_hlt_without_irqchip_halted() {
    if !kvm_available("test_payload_hlt_without_irqchip_halted") {
        return;
    }
    let (reason, _) = run(&[0xf4], CpuMode::Real);
    assert_eq!(reason, ExitReason::Halted);
}

#[test]
fn test_payload_garbage_to_ports_runaway_stopped_other_vm_unaffected() {
    if !kvm_available("test_payload_garbage_to_ports_runaway_stopped_other_vm_unaffected") {
        return;
    }
    // A second VM runs beside the hostile one and must finish normally.
    let good = std::thread::spawn(|| {
        let mut code = Vec::new();
        out_byte(&mut code, false, 0x501, 9);
        run(&code, CpuMode::Real)
    });
    // Garbage to every serial and i8042 register (but the reset command), unmapped ports and
    // the debug port's neighbours, then a runaway loop: the VMM survives all of it, and its
    // timeout stops the runaway guest, while the other VM is unaffected.
    let mut code = Vec::new();
    for port in (0x3f8..0x400)
        .chain(0x60..0x64)
        .chain([0x10, 0x500, 0x502, 0xcf8, 0xffff])
    {
        out_byte(&mut code, false, port, 0xa5);
    }
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let (reason, _) = run_for(&code, CpuMode::Real, Duration::from_millis(500));
    assert_eq!(reason, ExitReason::TimedOut);
    assert_eq!(good.join().unwrap().0, ExitReason::DebugExit(9));
}

#[test]
fn test_payload_long_mode_triple_fault_ends_vm() {
    if !kvm_available("test_payload_long_mode_triple_fault_ends_vm") {
        return;
    }
    // The VMM's IDT has a limit of 7: int3 (vector 3) is outside it -> #GP -> #DF -> shutdown.
    // On a restricted nested KVM (PVM) KVM reports an internal error instead: either way only
    // this VM ends, with a reason.
    let (reason, _) = run(&[0xcc], CpuMode::Long);
    assert!(
        matches!(reason, ExitReason::Reset | ExitReason::InternalError),
        "{reason:?}"
    );
}

#[test]
fn test_probe_gives_verdict_in_milliseconds() {
    if !kvm_available("test_probe_gives_verdict_in_milliseconds") {
        return;
    }
    let report = husk_vmm::probe::probe();
    println!(
        "probe: passed={} ({}) in {:?}",
        report.passed, report.detail, report.elapsed
    );
    assert!(!report.detail.is_empty());
    assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
}

/// `mov eax, dword [abs64]` then the four bytes of eax to COM1 (dx = 0x3f8 already).
fn read_mmio_to_serial(code: &mut Vec<u8>, addr: u64) {
    code.push(0xa1);
    code.extend_from_slice(&addr.to_le_bytes());
    for _ in 0..4 {
        code.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
}

fn vsock_device(dir: &tempfile::TempDir) -> Vec<Box<dyn VirtioMmioDevice>> {
    let config = VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vsock.sock"),
    };
    vec![Box::new(VsockMmio::new(&config).expect("vsock device"))]
}

#[test]
fn test_payload_virtio_mmio_vsock_magic_version_device_id() {
    if !kvm_available("test_payload_virtio_mmio_vsock_magic_version_device_id") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for offset in [0x0, 0x4, 0x8, 0x100, 0x104] {
        read_mmio_to_serial(&mut code, 0xd000_0000 + offset);
    }
    out_byte(&mut code, true, 0x501, 1);
    let (reason, out) = run_with(
        &code,
        CpuMode::Long,
        Duration::from_secs(10),
        vsock_device(&dir),
    );
    assert_eq!(reason, ExitReason::DebugExit(1));
    let expected: Vec<u8> = [
        &b"virt"[..],
        &[2, 0, 0, 0],
        &[19, 0, 0, 0],
        &[3, 0, 0, 0],
        &[0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(
        out.as_bytes(),
        expected,
        "magic, version 2, device id 19 (vsock), guest cid 3"
    );
}

#[test]
fn test_payload_garbage_to_virtio_mmio_registers_vm_goes_on() {
    if !kvm_available("test_payload_garbage_to_virtio_mmio_registers_vm_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mov eax, 0xa5a5a5a5; then `mov dword [abs64], eax` to every register of the window and
    // past it, including status (driver OK with garbage queues) and queue notify.
    let mut code = vec![0xb8, 0xa5, 0xa5, 0xa5, 0xa5];
    for offset in (0..0x120u64).step_by(4).chain([0xffc, 0x1000, 0x2000]) {
        code.push(0xa3);
        code.extend_from_slice(&(0xd000_0000 + offset).to_le_bytes());
    }
    out_byte(&mut code, true, 0x501, 2);
    let (reason, _) = run_with(
        &code,
        CpuMode::Long,
        Duration::from_secs(10),
        vsock_device(&dir),
    );
    assert_eq!(reason, ExitReason::DebugExit(2));
}

#[test]
fn test_husk_vmm_binary_payload_report_first_exit_and_memory() {
    if !kvm_available("test_husk_vmm_binary_payload_report_first_exit_and_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.bin");
    let mut code = Vec::new();
    out_byte(&mut code, true, husk_vmm::layout::DEBUG_EXIT_PORT, b'O');
    std::fs::write(&payload, &code).unwrap();
    let spawned = husk_vmm::monotonic_now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--payload")
        .arg(&payload)
        .arg("--console")
        .arg(dir.path().join("console.log"))
        .args(["--memory-mib", "16", "--timeout-secs", "10", "--report"])
        .output()
        .unwrap();
    assert!(output.status.success(), "husk-vmm: {output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["reason"], "DebugExit(79)");
    let first_exit = report["first_exit_monotonic_ns"].as_u64().unwrap();
    let since_spawn = Duration::from_nanos(first_exit).checked_sub(spawned);
    assert!(
        since_spawn.is_some_and(|d| d < Duration::from_secs(10)),
        "first exit {first_exit} ns is not after the spawn at {spawned:?}"
    );
    let own = report["rss_anon_kib"].as_u64().unwrap() + report["rss_file_kib"].as_u64().unwrap();
    assert!(own > 0, "no memory reported: {report}");
}

#[test]
fn test_husk_vmm_binary_no_kernel_no_payload_error() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(["--console", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--kernel"), "{stderr}");
}

/// Compiles the freestanding C payload `tests/payloads/<name>.c` in `dir` into a flat binary
/// that starts with `_start` at 0x1_0000 (`tests/payloads/payload.ld`). `Err` names a missing
/// tool; a payload that does not compile fails the test.
/// The C payload `name` built in `dir` where KVM and the C tools are there; `None` after the
/// one `SKIPPED:` line for `test` where not.
fn c_payload_or_skip(test: &str, name: &str, dir: &Path) -> Option<Vec<u8>> {
    if !kvm_available(test) {
        return None;
    }
    match build_c_payload(name, dir) {
        Ok(code) => Some(code),
        Err(why) => {
            println!("SKIPPED: {test}: {why}");
            None
        }
    }
}

fn build_c_payload(name: &str, dir: &Path) -> Result<Vec<u8>, String> {
    for tool in ["gcc", "ld"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("{tool} is not installed"));
        }
    }
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/payloads");
    let object = dir.join(format!("{name}.o"));
    let binary = dir.join(format!("{name}.bin"));
    // No SSE (the VMM leaves CR4.OSFXSR clear), no red zone, no stack protector or CET
    // notes; absolute addresses below 2 GiB (small model, no PIC).
    let compile = Command::new("gcc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .args(["-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie"])
        .args([
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-mno-red-zone",
        ])
        .args(["-mcmodel=small", "-mgeneral-regs-only"])
        .args([
            "-fno-asynchronous-unwind-tables",
            "-fno-tree-loop-distribute-patterns",
        ])
        .arg("-c")
        .arg(sources.join(format!("{name}.c")))
        .arg("-o")
        .arg(&object)
        .output()
        .unwrap();
    assert!(compile.status.success(), "gcc: {compile:?}");
    let link = Command::new("ld")
        .args(["-nostdlib", "-static", "-T"])
        .arg(sources.join("payload.ld"))
        .arg("-o")
        .arg(&binary)
        .arg(&object)
        .output()
        .unwrap();
    assert!(link.status.success(), "ld: {link:?}");
    Ok(std::fs::read(&binary).unwrap())
}

/// The host end of a guest-initiated vsock stream: accepts one connection on `listener`, reads
/// four bytes and answers "pong" if they are "ping". Returns what it read and the stream, kept
/// open until the caller drops it. Gives up when `stop` is set before a guest connects.
fn serve_ping_pong(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Vec<u8>, Option<UnixStream>)> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        return (Vec::new(), None);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        // A reset or timeout ends the read with what arrived; the caller checks it.
        let _ = (&stream).take(4).read_to_end(&mut got);
        if got == b"ping" {
            (&stream).write_all(b"pong").unwrap();
        }
        (got, Some(stream))
    })
}

#[test]
fn test_payload_vsock_virtqueue_round_trip_with_host_socket_pong() {
    let dir = tempfile::tempdir().unwrap();
    let Some(code) = c_payload_or_skip(
        "test_payload_vsock_virtqueue_round_trip_with_host_socket_pong",
        "vsock_roundtrip",
        dir.path(),
    ) else {
        return;
    };
    // Hybrid vsock: the guest's connection to host port 1234 goes to `<uds_path>_1234`.
    let devices = vsock_device(&dir);
    let listener = UnixListener::bind(dir.path().join("vsock.sock_1234")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let host = serve_ping_pong(listener, stop.clone());

    let (reason, out) = run_with(&code, CpuMode::Long, Duration::from_secs(10), devices);
    stop.store(true, Ordering::SeqCst);
    let (got, _stream) = host.join().unwrap();

    assert_eq!(reason, ExitReason::DebugExit(b'O'), "guest console: {out}");
    assert!(out.contains("vsock: received pong"), "guest console: {out}");
    assert_eq!(got, b"ping", "what the host read");
}

/// Waits for `child` at most `limit`; kills it and returns `None` when it is still running.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_husk_vmm_corrupted_vsock_avail_idx_and_driver_ok_twice_power_off_exits() {
    let test = "test_husk_vmm_corrupted_vsock_avail_idx_and_driver_ok_twice_power_off_exits";
    let dir = tempfile::tempdir().unwrap();
    let Some(code) = c_payload_or_skip(test, "vsock_hostile", dir.path()) else {
        return;
    };
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, &code).unwrap();
    let console = dir.path().join("console.log");
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--payload")
        .arg(&payload)
        .arg("--console")
        .arg(&console)
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock.sock"))
        .args(["--memory-mib", "16", "--timeout-secs", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(20));

    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    let status = status.unwrap_or_else(|| panic!("husk-vmm hung; console: {out}; log: {log}"));
    assert!(status.success(), "{status}; console: {out}; log: {log}");
    assert!(
        out.contains("vsock: device needs reset\n"),
        "console: {out}"
    );
    assert!(
        out.contains("vsock: driver ok twice ignored\n"),
        "console: {out}"
    );
    assert!(log.lines().count() <= 20, "log: {log}");
}

/// Every tracing event of this test process from now on, as `message` text (a global
/// subscriber: device workers log from their own threads). Also routes the `log` crate
/// (virtio-queue) through husk's rate-limited bridge, as the binaries do.
fn capture_logs() -> Arc<Mutex<Vec<String>>> {
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};

    struct Lines(Arc<Mutex<Vec<String>>>);
    struct Message(String);
    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    impl tracing::Subscriber for Lines {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut line = Message(String::new());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    static LINES: std::sync::OnceLock<Arc<Mutex<Vec<String>>>> = std::sync::OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            tracing::subscriber::set_global_default(Lines(lines.clone())).unwrap();
            husk_devices::install_log_bridge().unwrap();
            lines
        })
        .clone()
}

#[test]
fn test_payload_corrupted_vsock_avail_idx_needs_reset_bounded_log_vm_returns() {
    let test = "test_payload_corrupted_vsock_avail_idx_needs_reset_bounded_log_vm_returns";
    let dir = tempfile::tempdir().unwrap();
    let Some(code) = c_payload_or_skip(test, "vsock_hostile", dir.path()) else {
        return;
    };
    let lines = capture_logs();
    let devices = vsock_device(&dir);
    let (done, finished) = std::sync::mpsc::channel();

    // Run (and tear down: the devices are dropped before `run` returns) on a thread of its
    // own, so that a hang fails the test instead of blocking it.
    std::thread::spawn(move || {
        let _ = done.send(run_with(
            &code,
            CpuMode::Long,
            Duration::from_secs(20),
            devices,
        ));
    });
    let (reason, out) = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the VM did not end: a device worker hangs");

    let lines = lines.lock().unwrap().clone();
    assert_eq!(reason, ExitReason::Reset, "guest console: {out}");
    assert!(
        out.contains("vsock: driver ok twice ignored\n"),
        "guest console: {out}"
    );
    let broken = lines
        .iter()
        .filter(|l| l.contains("virtqueue corrupted"))
        .count();
    assert_eq!(broken, 1, "{lines:#?}");
    println!("{} log lines: {lines:?}", lines.len());
    // Other tests of this binary log too; each call site is rate-limited.
    assert!(lines.len() <= 40, "{} log lines: {lines:#?}", lines.len());
}

/// Prints `a`, spins until the byte at [`FLAG`] is set, then prints `bl` (set to `R` before
/// the spin: a register that must survive a snapshot) and `b`, and exits with 9.
fn spin_until_flag_payload() -> Vec<u8> {
    let mut code = vec![0xb3, b'R']; // mov bl, 'R'
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'a', 0xee]); // 'a' to COM1
    code.push(0xa0); // spin: movabs al, [FLAG]
    code.extend_from_slice(&FLAG.to_le_bytes());
    code.extend_from_slice(&[0x84, 0xc0, 0x74, 0xf3]); // test al, al; jz spin
    code.extend_from_slice(&[0x88, 0xd8, 0xee, 0xb0, b'b', 0xee]); // bl, then 'b'
    out_byte(&mut code, true, 0x501, 9);
    code
}

/// Guest-physical address of the flag [`spin_until_flag_payload`] waits for.
const FLAG: u64 = 0x2_0000;

fn wait_for_output(console: &Console, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&console.0.lock().unwrap()).contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} from the guest");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `code` (16 MiB, irqchip, long mode) with `virtio` until it prints `a`, pauses it and
/// saves it into the new directory `snap`.
fn save_paused_after_a(code: Vec<u8>, virtio: Vec<Box<dyn VirtioMmioDevice>>, snap: &Path) {
    let console = Console::default();
    let vm = Vm::new(VmConfig {
        memory_mib: 16,
        irqchip: true,
        console: Box::new(console.clone()),
        virtio,
        entry: Entry::Payload {
            code,
            addr: 0x1_0000,
            mode: CpuMode::Long,
        },
    })
    .unwrap();
    let pauser = vm.pauser();
    let pausing = std::thread::spawn(move || {
        wait_for_output(&console, "a");
        pauser.pause();
    });
    let files = husk_vmm::snapshot::SnapshotFiles::create(snap).unwrap();
    let report = vm.run_to_snapshot(Duration::from_secs(10), files).unwrap();
    pausing.join().unwrap();
    assert_eq!(report.reason, ExitReason::Paused);
}

#[test]
fn test_payload_paused_snapshot_restores_registers_and_memory_in_new_vm() {
    if !kvm_available("test_payload_paused_snapshot_restores_registers_and_memory_in_new_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    save_paused_after_a(spin_until_flag_payload(), Vec::new(), &snap);

    let restored_console = Console::default();
    let restored = Vm::restore(RestoreConfig {
        snapshot: snap.clone(),
        console: Box::new(restored_console.clone()),
        virtio: Vec::new(),
        memory_mib: 16,
        vcpus: 1,
    })
    .unwrap();
    vm_memory::Bytes::write_obj(restored.memory(), 1u8, vm_memory::GuestAddress(FLAG)).unwrap();
    let reason = restored.run(Duration::from_secs(10)).unwrap();

    assert_eq!(reason, ExitReason::DebugExit(9));
    assert_eq!(
        String::from_utf8_lossy(&restored_console.0.lock().unwrap()),
        "Rb",
        "the restored guest goes on from the spin with its registers"
    );
    let mut flag = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(snap.join(husk_vmm::snapshot::MEMORY_FILE)).unwrap(),
        &mut flag,
        FLAG,
    )
    .unwrap();
    assert_eq!(
        flag,
        [0],
        "the restored VM writes its own copy, never the snapshot"
    );
}

#[test]
fn test_payload_restore_of_damaged_snapshot_fails_with_reason() {
    if !kvm_available("test_payload_restore_of_damaged_snapshot_fails_with_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let err = Vm::restore(RestoreConfig {
        snapshot: dir.path().join("missing"),
        console: Box::new(Console::default()),
        virtio: Vec::new(),
        memory_mib: 16,
        vcpus: 1,
    })
    .unwrap_err();
    assert!(err.to_string().starts_with("snapshot: "), "{err}");
}

/// `mov eax, value; mov dword [addr], eax`.
fn mmio_write32(code: &mut Vec<u8>, addr: u64, value: u32) {
    code.push(0xb8);
    code.extend_from_slice(&value.to_le_bytes());
    code.push(0xa3);
    code.extend_from_slice(&addr.to_le_bytes());
}

/// Plays a virtio driver bringing up the vsock device at the first window (three queues of 8
/// in zeroed memory from 0x30000, DRIVER_OK), prints `a`, spins until [`FLAG`], then prints
/// the device status register's low byte and `b`, and exits with 9.
fn vsock_driver_payload() -> Vec<u8> {
    const WINDOW: u64 = 0xd000_0000;
    let mut code = Vec::new();
    for (reg, value) in [(0x070, 1), (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 11)] {
        mmio_write32(&mut code, WINDOW + reg, value);
    }
    for q in 0..3u32 {
        let base = 0x3_0000 + q * 0x1000;
        for (reg, value) in [
            (0x030, q),
            (0x038, 8),
            (0x080, base),
            (0x090, base + 0x100),
            (0x0a0, base + 0x200),
            (0x044, 1),
        ] {
            mmio_write32(&mut code, WINDOW + reg, value);
        }
    }
    mmio_write32(&mut code, WINDOW + 0x070, 15);
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'a', 0xee]); // 'a' to COM1
    code.push(0xa0); // spin: movabs al, [FLAG]
    code.extend_from_slice(&FLAG.to_le_bytes());
    code.extend_from_slice(&[0x84, 0xc0, 0x74, 0xf3]); // test al, al; jz spin
    code.push(0xa1); // mov eax, [status]
    code.extend_from_slice(&(WINDOW + 0x070).to_le_bytes());
    code.extend_from_slice(&[0xee, 0xb0, b'b', 0xee]); // status byte, then 'b'
    out_byte(&mut code, true, 0x501, 9);
    code
}

#[test]
fn test_payload_active_vsock_device_saved_and_restored_with_new_host_side() {
    if !kvm_available("test_payload_active_vsock_device_saved_and_restored_with_new_host_side") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    save_paused_after_a(vsock_driver_payload(), vsock_device(&dir), &snap);

    let restored_dir = tempfile::tempdir().unwrap();
    let restored_console = Console::default();
    let restored = Vm::restore(RestoreConfig {
        snapshot: snap.clone(),
        console: Box::new(restored_console.clone()),
        virtio: vsock_device(&restored_dir),
        memory_mib: 16,
        vcpus: 1,
    })
    .unwrap();
    vm_memory::Bytes::write_obj(restored.memory(), 1u8, vm_memory::GuestAddress(FLAG)).unwrap();
    let reason = restored.run(Duration::from_secs(10)).unwrap();

    assert_eq!(reason, ExitReason::DebugExit(9));
    assert_eq!(
        restored_console.0.lock().unwrap().as_slice(),
        b"\x0fb",
        "the restored device is where the driver left it: DRIVER_OK and the rest"
    );
    let wrong = Vm::restore(RestoreConfig {
        snapshot: snap,
        console: Box::new(Console::default()),
        virtio: Vec::new(),
        memory_mib: 16,
        vcpus: 1,
    })
    .unwrap_err();
    assert!(
        wrong.to_string().contains("differ from the saved VM's"),
        "{wrong}"
    );
}
