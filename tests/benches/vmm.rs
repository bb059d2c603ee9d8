//! `make bench`, built-in VMM (issue 3's targets), next to QEMU in the same run:
//!
//! 1. On this host's KVM, with tiny payloads (they run even where KVM cannot run Linux):
//!    process start to the guest's first instruction and to the process's exit, and the VMM's
//!    resident memory beyond guest memory while a guest spins, for `husk-vmm` and for plain
//!    `qemu-system-x86_64 -M microvm -accel kvm`.
//! 2. Hello-world `husk run` through both doors (the built-in VMM restored from its boot
//!    snapshot and booting cold, issue 15's ratio) and husk-vmm's boot to agent ready with its
//!    memory, on a KVM that runs Linux: this host's where it passes the probe, else inside the
//!    emulated test host (where the built-in VMM's ratio to the QEMU door is what carries over).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use husk_e2e::harness::nested::{canonical, run_nested};
use husk_e2e::harness::Env;
use nix::time::{clock_gettime, ClockId};

const PAYLOAD_RUNS: usize = 20;
const GUEST_RUNS: usize = 3;
/// Guest RAM of the payload VMs.
const PAYLOAD_MIB: &str = "16";

fn monotonic() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, Duration::from)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 64-bit code for husk-vmm at 0x10000: `out` 'O' to the debug-exit port 0x501 (ends the VM),
/// or spin forever.
fn vmm_payload(dir: &Path, spin: bool) -> std::path::PathBuf {
    let code: &[u8] = match spin {
        false => &[0x66, 0xba, 0x01, 0x05, 0xb0, b'O', 0xee, 0xf4],
        true => &[0xeb, 0xfe],
    };
    let path = dir.join(if spin { "spin.bin" } else { "exit.bin" });
    std::fs::write(&path, code).expect("payload");
    path
}

/// A 64 KiB firmware image for QEMU: at the reset vector (real mode), `out` 'O' to an
/// isa-debug-exit port 0xf4 (QEMU exits with status 159), or spin forever.
fn qemu_bios(dir: &Path, spin: bool) -> std::path::PathBuf {
    let mut image = vec![0u8; 64 << 10];
    let code: &[u8] = match spin {
        false => &[0xb0, b'O', 0xe6, 0xf4, 0xf4],
        true => &[0xeb, 0xfe],
    };
    image[0xfff0..0xfff0 + code.len()].copy_from_slice(code);
    let path = dir.join(if spin { "spin.rom" } else { "exit.rom" });
    std::fs::write(&path, image).expect("bios");
    path
}

fn husk_vmm_command(vmm: &Path, payload: &Path, console: &Path) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--payload")
        .arg(payload)
        .arg("--console")
        .arg(console)
        .args(["--memory-mib", PAYLOAD_MIB, "--timeout-secs", "10"]);
    cmd
}

fn qemu_command(bios: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    let backend = format!("memory-backend-memfd,id=ram,size={PAYLOAD_MIB}M,share=on");
    cmd.args([
        "-M",
        "microvm,acpi=off,pit=off,pic=off,rtc=off,isa-serial=off,memory-backend=ram",
    ])
    .args([
        "-accel",
        "kvm",
        "-m",
        &format!("{PAYLOAD_MIB}M"),
        "-object",
        &backend,
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-bios"])
    .arg(bios);
    cmd
}

/// Wall time from spawn to exit; the exit status must be `expect`.
fn time_to_exit(mut cmd: Command, expect: i32) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("spawn");
    let t = start.elapsed();
    assert_eq!(out.status.code(), Some(expect), "{cmd:?}: {out:?}");
    (t, out.stdout)
}

/// RssAnon + RssFile (KiB) of a spinning guest's process after `settle`: what the VMM holds
/// beyond guest RAM (a shared memfd in both, so RssShmem).
fn own_memory_kib(mut cmd: Command, settle: Duration) -> u64 {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(settle);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("RssAnon:") + field("RssFile:")
}

fn payload_bench(criterion: &mut Criterion, vmm: &Path) {
    let dir = tempfile::tempdir().expect("tmp");
    let console = dir.path().join("console.log");
    let (exit, spin) = (
        vmm_payload(dir.path(), false),
        vmm_payload(dir.path(), true),
    );
    let (rom_exit, rom_spin) = (qemu_bios(dir.path(), false), qemu_bios(dir.path(), true));
    let qemu_kvm = qemu_command(&rom_exit)
        .output()
        .is_ok_and(|o| o.status.code() == Some(159));
    if !qemu_kvm {
        println!("SKIPPED: plain QEMU baseline: qemu-system-x86_64 -accel kvm cannot run the payload here");
    }
    let mut first = Vec::new();
    let mut walls: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut group = criterion.benchmark_group("payload_start_to_exit");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(PAYLOAD_RUNS)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("husk-vmm", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let spawned = monotonic();
                let mut cmd = husk_vmm_command(vmm, &exit, &console);
                cmd.arg("--report");
                let (t, stdout) = time_to_exit(cmd, 0);
                let report: serde_json::Value = serde_json::from_slice(&stdout).expect("report");
                let first_exit = report["first_exit_monotonic_ns"].as_u64().unwrap_or(0);
                first.push(ms(Duration::from_nanos(first_exit).saturating_sub(spawned)));
                walls.entry("husk-vmm").or_default().push(ms(t));
                total += t;
            }
            total
        })
    });
    if qemu_kvm {
        group.bench_function("qemu microvm (kvm)", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, _) = time_to_exit(qemu_command(&rom_exit), 159);
                    walls.entry("qemu").or_default().push(ms(t));
                    total += t;
                }
                total
            })
        });
    }
    group.finish();
    let settle = Duration::from_millis(300);
    let vmm_mem: Vec<f64> = (0..5)
        .map(|_| own_memory_kib(husk_vmm_command(vmm, &spin, &console), settle) as f64)
        .collect();
    let qemu_mem: Vec<f64> = (0..5)
        .map(|_| own_memory_kib(qemu_command(&rom_spin), settle) as f64)
        .collect();
    let vmm_wall = median(walls.remove("husk-vmm").unwrap_or_default());
    let qemu_wall = median(walls.remove("qemu").unwrap_or_default());
    let (vmm_mem, qemu_mem) = (median(vmm_mem) / 1024.0, median(qemu_mem) / 1024.0);
    println!("\nbuilt-in VMM on this host's KVM, tiny payload, {PAYLOAD_MIB} MiB guest, medians of {PAYLOAD_RUNS}+ runs:");
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "husk-vmm", "plain QEMU", "QEMU/husk"
    );
    println!(
        "{:<34} {:>9.2} ms {:>12} {:>12}",
        "process start to first guest exit",
        median(first),
        "-",
        "-"
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>11.1}x",
        "process start to process exit",
        vmm_wall,
        qemu_wall,
        qemu_wall / vmm_wall
    );
    println!(
        "{:<34} {:>8.2} MiB {:>8.2} MiB {:>11.1}x",
        "resident memory beyond guest RAM",
        vmm_mem,
        qemu_mem,
        qemu_mem / vmm_mem
    );
}

/// Parses `key=value` words of a bench line.
fn fields(line: &str) -> BTreeMap<&str, f64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
        .collect()
}

fn guest_bench(env: &Env, host_kvm_runs_linux: bool) {
    let args = [
        canonical(env.husk.clone()),
        canonical(env.husk.with_file_name("husk-vmm")),
        env!("CARGO_BIN_EXE_husk-agent-ping").to_owned(),
        canonical(env.share.join("vmlinux")),
        canonical(env.share.join("initramfs.cpio")),
        GUEST_RUNS.to_string(),
    ];
    let script = format!("{}/nested/bench.sh", env!("CARGO_MANIFEST_DIR"));
    let (where_, text) = match host_kvm_runs_linux {
        true => {
            let out = Command::new("sh")
                .arg(&script)
                .args(&args)
                .output()
                .expect("bench.sh");
            (
                "this host's KVM",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
        false => (
            "the emulated test host (KVM under TCG)",
            run_nested(env, "bench.sh", &args),
        ),
    };
    if let Some(failed) = text.lines().find(|l| l.starts_with("BENCH-FAILED")) {
        panic!("guest bench failed: {failed}\n{text}");
    }
    let runs = |door: &str| -> Vec<BTreeMap<&str, f64>> {
        text.lines()
            .filter(|l| l.starts_with(&format!("BENCH door={door} ")))
            .map(fields)
            .collect()
    };
    let (kvm, cold, qemu) = (runs("kvm"), runs("kvm-cold"), runs("qemu"));
    assert!(
        !kvm.is_empty() && !cold.is_empty() && !qemu.is_empty(),
        "no bench lines:\n{text}"
    );
    let col = |rows: &[BTreeMap<&str, f64>], key: &str| {
        median(rows.iter().filter_map(|r| r.get(key).copied()).collect())
    };
    println!("\nhello-world `husk run` on {where_}, medians of {GUEST_RUNS} runs:");
    println!(
        "{:<24} {:>16} {:>16} {:>14} {:>12} {:>12}",
        "", "VMM (snapshot)", "VMM (cold)", "QEMU door", "cold/snap", "QEMU/cold"
    );
    for (label, key) in [
        ("wall", "wall_ms"),
        ("boot to agent ready", "boot_to_agent_ms"),
        ("container start", "container_start_ms"),
    ] {
        let (a, b, c) = (col(&kvm, key), col(&cold, key), col(&qemu, key));
        println!(
            "{label:<24} {a:>13.0} ms {b:>13.0} ms {c:>11.0} ms {:>11.2}x {:>11.2}x",
            b / a,
            c / b
        );
    }
    let vmm: Vec<(f64, serde_json::Value)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("BENCH-VMM "))
        .filter_map(|l| {
            let (head, json) = l.split_once(' ')?;
            Some((
                fields(head).get("handshake_ms").copied()?,
                serde_json::from_str(json).ok()?,
            ))
        })
        .collect();
    let kib = |key: &str| median(vmm.iter().filter_map(|(_, r)| r[key].as_f64()).collect());
    println!(
        "husk-vmm alone: start to agent handshake {:.0} ms; VMM memory beyond guest RAM {:.2} MiB \
         (anon {:.2} + file {:.2}); guest RAM touched {:.1} MiB",
        median(vmm.iter().map(|(t, _)| *t).collect()),
        (kib("rss_anon_kib") + kib("rss_file_kib")) / 1024.0,
        kib("rss_anon_kib") / 1024.0,
        kib("rss_file_kib") / 1024.0,
        kib("rss_shmem_kib") / 1024.0
    );
}

fn main() {
    let Some(env) = Env::get("bench built-in VMM") else {
        return;
    };
    let vmm = env.husk.with_file_name("husk-vmm");
    let mut criterion = Criterion::default().configure_from_args();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        payload_bench(&mut criterion, &vmm);
    } else {
        println!("SKIPPED: built-in VMM payload bench: /dev/kvm is not available on this host");
    }
    let check = Command::new(&env.husk)
        .arg("check")
        .output()
        .expect("husk check");
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    let passes = check.contains("kvm probe: passed");
    if !passes {
        let probe = check
            .lines()
            .find(|l| l.starts_with("kvm probe"))
            .unwrap_or("kvm probe: -");
        println!(
            "\nthis host's KVM cannot run a Linux guest ({probe}): the targets on real KVM (start \
             to first instruction <= 10 ms, boot to agent <= 150 ms) are measured on such a host; \
             here the guest runs inside the emulated test host, so its ratios are what counts"
        );
    }
    guest_bench(&env, passes);
}
