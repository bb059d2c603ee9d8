//! `make bench`: containerd with `io.containerd.runc.v2` next to `io.containerd.husk.v2`, same
//! private containerd, same run. Latency of `ctr run --rm IMAGE id true` through criterion (10
//! samples of one run each) plus our own medians; and the host memory of a running container:
//! 3 detached `sleep` containers per runtime, each one's shim and everything it spawned (runc:
//! the container's process; husk: the VMM and virtiofsd), as PSS from
//! /proc/<pid>/smaps_rollup, so pages the shims share are not counted three times, plus the
//! pages of the VM's memory (a memfd) that no process maps (a restored VM's copy of its
//! snapshot's memory holds pages its guest has not touched yet). Through containerd's CRI
//! plugin (as a kubelet): the time from `RunPodSandbox` until
//! `StartContainer` of the pod's first container returned, median of 5 pods. Density: the PSS
//! per container with 20 husk containers running at once, their VMs restored from one boot
//! snapshot (the default) and then booted cold (`io.husk.snapshot=false`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime};
use husk_e2e::harness::cri::{container, pod_config, Cri};
use husk_e2e::harness::median;
use husk_e2e::harness::procs::{self, Proc};

const RUNS: usize = 10;
const CONTAINERS: usize = 3;
const PODS: usize = 5;
/// Containers running at once for the density rows.
const DENSE: usize = 20;

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

/// PSS (KiB) per running container (shim plus what it spawned), and per process name, with
/// `n` `sleep` containers started with `flags` running at once.
fn memory(ctr: &Ctr<'_>, n: usize, flags: &[&str]) -> (Vec<u64>, BTreeMap<String, Vec<u64>>) {
    let ids: Vec<String> = (0..n).map(|i| format!("mem-{i}")).collect();
    for id in &ids {
        ctr.run_detached(flags, id, &["sleep", "1000"]);
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
            if p.is_vmm() {
                *names
                    .entry("guest memory mapped by none".into())
                    .or_default() += p.unmapped_guest_memory_kib();
            }
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

/// CRI pod starts: `RunPodSandbox`, then `CreateContainer` and `StartContainer` of one
/// container (what a kubelet waits for); the pods are removed untimed.
fn pod_starts(containerd: &Containerd, runtime: Runtime) -> Vec<Duration> {
    let label = runtime.label();
    let logs = tempfile::tempdir().expect("log dir");
    let mut cri = Cri::connect(containerd.socket(), label);
    (0..PODS)
        .map(|i| {
            let config = pod_config(&format!("bench-{label}-{i}"), logs.path());
            let app = container("app", &["sleep", "1000"], &format!("app-{i}.log"), 0);
            let start = Instant::now();
            let pod = cri.run_pod(&config, label);
            let id = cri.create_and_start(&pod, &config, app);
            let t = start.elapsed();
            cri.remove_container(&id);
            cri.remove_pod(&pod);
            t
        })
        .collect()
}

fn main() {
    let Some(containerd) = Containerd::get_cri("bench containerd") else {
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
        let (totals, by_name) = memory(&ctr, CONTAINERS, &[]);
        let parts: Vec<String> = by_name
            .into_iter()
            .map(|(name, kibs)| format!("{name} {:.1} MiB", median(kibs) as f64 / 1024.0))
            .collect();
        breakdown.push(format!("{}: {}", runtime.type_name(), parts.join(", ")));
        let pods = pod_starts(&containerd, runtime);
        summary.push((
            runtime.type_name(),
            median(times),
            median(totals),
            median(pods),
        ));
    }
    let density = match Runtime::Husk.missing() {
        Some(_) => Vec::new(),
        None => {
            let ctr = containerd.ctr(Runtime::Husk, "bench-dense");
            let cold = ["--annotation", "io.husk.snapshot=false"];
            [("restored", &[][..]), ("cold", &cold[..])]
                .into_iter()
                .map(|(label, flags)| (label, median(memory(&ctr, DENSE, flags).0)))
                .collect()
        }
    };
    println!("\nctr run --rm true (median of {RUNS}+ runs), PSS per running container (median of {CONTAINERS}), CRI pod start (median of {PODS}):");
    println!(
        "{:<24} {:>12} {:>24} {:>16}",
        "runtime", "latency", "host memory/container", "CRI pod start"
    );
    for (name, t, kib, pod) in &summary {
        println!(
            "{name:<24} {:>9.0} ms {:>20.1} MiB {:>13.0} ms",
            t.as_secs_f64() * 1e3,
            *kib as f64 / 1024.0,
            pod.as_secs_f64() * 1e3
        );
    }
    println!("memory by process (median per container):");
    for line in &breakdown {
        println!("  {line}");
    }
    if let [(_, runc_t, runc_m, runc_p), (_, husk_t, husk_m, husk_p)] = summary[..] {
        println!(
            "husk / runc: latency x{:.1}, memory x{:.1}, CRI pod start x{:.1}",
            husk_t.as_secs_f64() / runc_t.as_secs_f64(),
            husk_m as f64 / runc_m.max(1) as f64,
            husk_p.as_secs_f64() / runc_p.as_secs_f64()
        );
    }
    if let [(_, restored), (_, cold)] = density[..] {
        println!(
            "husk, {DENSE} containers running at once, PSS per container (median): \
             restored from one snapshot {:.1} MiB, cold {:.1} MiB, restored / cold {:.0}%",
            restored as f64 / 1024.0,
            cold as f64 / 1024.0,
            restored as f64 * 100.0 / cold.max(1) as f64
        );
    }
}
