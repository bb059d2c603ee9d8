//! `make bench`: containerd with `io.containerd.runc.v2` next to `io.containerd.husk.v2`, same
//! private containerd, same run. Latency of `ctr run --rm IMAGE id true` through criterion (10
//! samples of one run each) plus our own medians; and the host memory of a running container:
//! 3 detached `sleep` containers per runtime, each one's shim and everything it spawned (runc:
//! the container's process; husk: the VMM and virtiofsd), as PSS from
//! /proc/<pid>/smaps_rollup, so pages the shims share are not counted three times.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime};
use husk_e2e::harness::procs::{self, Proc};

const RUNS: usize = 10;
const CONTAINERS: usize = 3;

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

/// `ctr run --rm` latencies of `true`, through criterion.
fn latencies(criterion: &mut Criterion, ctr: &Ctr<'_>) -> Vec<Duration> {
    let mut times = Vec::new();
    let mut group = criterion.benchmark_group("ctr_run_true");
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    let mut n = 0;
    group.bench_function(ctr.runtime().type_name(), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let start = Instant::now();
                let out = ctr.run(&["--rm"], &format!("true-{n}"), &["true"]);
                let t = start.elapsed();
                assert!(out.status.success(), "ctr run true: {out:?}");
                total += t;
                times.push(t);
            }
            total
        })
    });
    group.finish();
    times
}

/// PSS (KiB) per running container (shim plus what it spawned), and per process name.
fn memory(ctr: &Ctr<'_>) -> (Vec<u64>, BTreeMap<String, Vec<u64>>) {
    let ids: Vec<String> = (0..CONTAINERS).map(|i| format!("mem-{i}")).collect();
    for id in &ids {
        ctr.run_detached(&[], id, &["sleep", "1000"]);
    }
    // Let the guests settle after boot before sampling (no effect on runc).
    std::thread::sleep(Duration::from_secs(2));
    let mut totals = Vec::new();
    let mut by_name: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for id in &ids {
        let shim = ctr.shim(id).expect("shim of a running container");
        let mut tree: Vec<Proc> = procs::descendants(shim.pid);
        tree.push(shim);
        let mut names: BTreeMap<String, u64> = BTreeMap::new();
        for p in &tree {
            *names.entry(p.name.clone()).or_default() += p.pss_kib();
        }
        totals.push(names.values().sum());
        for (name, kib) in names {
            by_name.entry(name).or_default().push(kib);
        }
    }
    for id in &ids {
        for args in [
            vec!["task", "kill", "-s", "KILL", id],
            vec!["task", "delete", "--force", id],
            vec!["container", "delete", id],
        ] {
            let _ = ctr.ctr(&args);
        }
    }
    (totals, by_name)
}

fn main() {
    let Some(containerd) = Containerd::get("bench containerd") else {
        return;
    };
    let mut criterion = Criterion::default().configure_from_args().sample_size(RUNS);
    let mut summary = Vec::new();
    let mut breakdown = Vec::new();
    for runtime in [Runtime::Runc, Runtime::Husk] {
        if let Some(reason) = runtime.missing() {
            println!(
                "SKIPPED: bench containerd ({} half): {reason}",
                runtime.label()
            );
            continue;
        }
        let ctr = containerd.ctr(runtime, "bench");
        let times = latencies(&mut criterion, &ctr);
        let (totals, by_name) = memory(&ctr);
        let parts: Vec<String> = by_name
            .into_iter()
            .map(|(name, kibs)| format!("{name} {:.1} MiB", median(kibs) as f64 / 1024.0))
            .collect();
        breakdown.push(format!("{}: {}", runtime.type_name(), parts.join(", ")));
        summary.push((runtime.type_name(), median(times), median(totals)));
    }
    println!("\nctr run --rm true (median of {RUNS}+ runs) and PSS per running container (median of {CONTAINERS}):");
    println!(
        "{:<24} {:>12} {:>24}",
        "runtime", "latency", "host memory/container"
    );
    for (name, t, kib) in &summary {
        println!(
            "{name:<24} {:>9.0} ms {:>20.1} MiB",
            t.as_secs_f64() * 1e3,
            *kib as f64 / 1024.0
        );
    }
    println!("memory by process (median per container):");
    for line in &breakdown {
        println!("  {line}");
    }
    if let [(_, runc_t, runc_m), (_, husk_t, husk_m)] = summary[..] {
        println!(
            "husk / runc: latency x{:.1}, memory x{:.1}",
            husk_t.as_secs_f64() / runc_t.as_secs_f64(),
            husk_m as f64 / runc_m.max(1) as f64
        );
    }
}
