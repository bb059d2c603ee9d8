//! `make bench`: hello-world `husk run` (restored from its boot snapshot, the default, and
//! cold with `--no-snapshot`) next to `runc run` on the same busybox bundle, in the same run. Latency through criterion (10 samples of one run each) plus our own medians, and
//! the peak host memory of each runtime's whole process tree (husk + QEMU + virtiofsd; runc +
//! the container), sampled from /proc every 5 ms.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use husk_e2e::harness::{median, Env, Husk, TestBundle};

const RUNS: usize = 10;

/// One timed run: wall time, and the peak RSS (KiB) of the tree rooted at the spawned process,
/// in all and per process name (each name's own peak).
fn measure(mut cmd: Command) -> (Duration, u64, BTreeMap<String, u64>) {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let root = child.id();
    let mut peak = 0;
    let mut by_name = BTreeMap::new();
    loop {
        let sample = tree_rss_kib(root);
        peak = peak.max(sample.values().sum());
        for (name, kib) in sample {
            let entry = by_name.entry(name).or_insert(0);
            *entry = (*entry).max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{cmd:?} failed: {status}");
            return (start.elapsed(), peak, by_name);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// VmRSS of `root` and all its descendants, summed per process name.
fn tree_rss_kib(root: u32) -> BTreeMap<String, u64> {
    let mut parent = HashMap::new();
    let mut rss = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        for line in status.lines() {
            let mut it = line.split_whitespace();
            match (it.next(), it.next()) {
                (Some("Name:"), Some(v)) => name = v.to_owned(),
                (Some("PPid:"), Some(v)) => drop(parent.insert(pid, v.parse::<u32>().unwrap_or(0))),
                (Some("VmRSS:"), Some(v)) => {
                    drop(rss.insert(pid, (name.clone(), v.parse::<u64>().unwrap_or(0))))
                }
                _ => {}
            }
        }
    }
    let in_tree = |mut pid: u32| loop {
        if pid == root {
            return true;
        }
        match parent.get(&pid) {
            Some(&p) if p != 0 && p != pid => pid = p,
            _ => return false,
        }
    };
    let mut by_name = BTreeMap::new();
    for (pid, (name, kib)) in rss {
        if in_tree(pid) {
            *by_name.entry(name).or_insert(0) += kib;
        }
    }
    by_name
}

struct Runtime<'a> {
    name: &'static str,
    command: Box<dyn Fn(usize) -> Command + 'a>,
}

fn runtimes<'a>(
    husk: &'a Husk,
    bundle: &'a TestBundle,
    runc_root: &'a std::path::Path,
) -> Vec<Runtime<'a>> {
    let bundle_dir = bundle.path().to_str().expect("utf-8").to_owned();
    let (restored, cold) = (bundle_dir.clone(), bundle_dir.clone());
    let mut runtimes = vec![
        Runtime {
            name: "husk run (restored)",
            command: Box::new(move |i| {
                husk.command(&["run", "--bundle", &restored, &format!("bench-{i}")])
            }),
        },
        Runtime {
            name: "husk run (cold)",
            command: Box::new(move |i| {
                husk.command(&[
                    "run",
                    "--no-snapshot",
                    "--bundle",
                    &cold,
                    &format!("bench-cold-{i}"),
                ])
            }),
        },
    ];
    if Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        runtimes.push(Runtime {
            name: "runc run",
            command: Box::new(move |i| {
                let mut c = Command::new("runc");
                c.arg("--root").arg(runc_root).args([
                    "run",
                    "--bundle",
                    &bundle_dir,
                    &format!("bench-{i}"),
                ]);
                c
            }),
        });
    } else {
        println!("SKIPPED: runc baseline: runc is not installed (apt-get install runc)");
    }
    runtimes
}

fn main() {
    let Some(env) = Env::get("bench hello-world") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["echo", "hello"]);
    let runc_root = tempfile::tempdir().expect("runc root");
    let mut criterion = Criterion::default().configure_from_args().sample_size(RUNS);
    let mut summary = Vec::new();
    let mut breakdown = Vec::new();
    for rt in runtimes(&husk, &bundle, runc_root.path()) {
        let mut times = Vec::new();
        let mut peaks = Vec::new();
        let mut per_process: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut group = criterion.benchmark_group("hello_world");
        group
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_millis(1));
        let mut n = 0;
        group.bench_function(rt.name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let (t, peak, by_name) = measure((rt.command)(n));
                    total += t;
                    times.push(t);
                    peaks.push(peak);
                    for (name, kib) in by_name {
                        per_process.entry(name).or_default().push(kib);
                    }
                }
                total
            })
        });
        group.finish();
        let parts: Vec<String> = per_process
            .into_iter()
            .filter(|(_, kibs)| median(kibs.clone()) > 0)
            .map(|(name, kibs)| format!("{name} {:.1} MiB", median(kibs) as f64 / 1024.0))
            .collect();
        breakdown.push(format!("{}: {}", rt.name, parts.join(", ")));
        summary.push((rt.name, median(times), median(peaks)));
    }
    husk.assert_clean();
    println!("\nhello-world, median of {RUNS}+ runs, same machine, same run:");
    println!(
        "{:<24} {:>12} {:>22}",
        "runtime", "latency", "peak host memory"
    );
    for (name, t, kib) in &summary {
        println!(
            "{name:<24} {:>9.0} ms {:>18.1} MiB",
            t.as_secs_f64() * 1e3,
            *kib as f64 / 1024.0
        );
    }
    println!("peak memory by process (median of each name's own peak):");
    for line in &breakdown {
        println!("  {line}");
    }
    if let Some(&(_, runc_t, runc_m)) = summary.iter().find(|(n, _, _)| *n == "runc run") {
        for (name, t, m) in summary.iter().filter(|(n, _, _)| *n != "runc run") {
            println!(
                "{name} / runc: latency x{:.1}, memory x{:.1}",
                t.as_secs_f64() / runc_t.as_secs_f64(),
                *m as f64 / runc_m.max(1) as f64
            );
        }
    }
    if let [(_, restored, _), (_, cold, _), ..] = summary[..] {
        println!(
            "husk restored / cold: latency x{:.2}",
            restored.as_secs_f64() / cold.as_secs_f64()
        );
    }
}
