//! `make bench`: Docker and Podman with runc next to husk, same engines, same run. Latency of
//! `run --rm --network none IMAGE true` (median of 5 after one warm-up), and the host memory of
//! one running `sleep` container: the PSS (/proc/<pid>/smaps_rollup) of the engine's per-container
//! monitor (conmon, containerd's shim) and everything under it (runc: the container's process;
//! husk: its monitor, the jailed VMM, the serial relay, virtiofsd and the sentinel).

use std::time::{Duration, Instant};

use husk_e2e::harness::engines::{run_args, Docker, Engine, EngineRuntime, Podman};
use husk_e2e::harness::median;
use husk_e2e::harness::procs::{self, Proc};

const RUNS: usize = 5;

/// Median latency of `run --rm ... true`.
fn latency(engine: &dyn Engine) -> Duration {
    let flags = engine.run_flags();
    let args = run_args(&flags, &["--rm"], &["true"]);
    let mut times = Vec::new();
    for i in 0..=RUNS {
        let start = Instant::now();
        let out = engine.run(&args, b"");
        assert!(out.status.success(), "run true: {out:?}");
        if i > 0 {
            times.push(start.elapsed());
        }
    }
    median(times)
}

/// PSS (KiB) of one running container: its per-container monitor (named `monitor`, found by
/// the container id on its command line) and its descendants.
fn memory(engine: &dyn Engine, monitor: &str) -> u64 {
    let flags = engine.run_flags();
    let args = run_args(&flags, &["-d"], &["sleep", "1000"]);
    let out = engine.run(&args, b"");
    assert!(out.status.success(), "run -d: {out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    std::thread::sleep(Duration::from_secs(2));
    let root = procs::all()
        .into_iter()
        .find(|p| p.name.starts_with(monitor) && p.mentions(&id))
        .expect("the container's monitor process");
    let mut tree: Vec<Proc> = procs::descendants(root.pid);
    tree.push(root);
    let kib = tree.iter().map(Proc::pss_kib).sum();
    let _ = engine.run(&["rm", "-f", &id], b"");
    kib
}

fn main() {
    let mut lines = Vec::new();
    for runtime in [EngineRuntime::Runc, EngineRuntime::Husk] {
        if let Some(podman) = Podman::get("bench engines", runtime) {
            lines.push((
                "podman",
                runtime,
                latency(&podman),
                memory(&podman, "conmon"),
            ));
        }
        if let Some(docker) = Docker::get("bench engines", runtime) {
            lines.push((
                "docker",
                runtime,
                latency(&docker),
                memory(&docker, "containerd-shim"),
            ));
        }
    }
    println!(
        "\nrun --rm --network none IMAGE true (median of {RUNS}), PSS of one running container:"
    );
    for engine in ["docker", "podman"] {
        let of = |rt| lines.iter().find(|l| l.0 == engine && l.1 == rt);
        if let (Some(runc), Some(husk)) = (of(EngineRuntime::Runc), of(EngineRuntime::Husk)) {
            println!(
                "  {engine}: runc {:.0} ms, husk {:.0} ms (x{:.1}); runc {:.1} MiB, husk {:.1} MiB",
                runc.2.as_secs_f64() * 1e3,
                husk.2.as_secs_f64() * 1e3,
                husk.2.as_secs_f64() / runc.2.as_secs_f64(),
                runc.3 as f64 / 1024.0,
                husk.3 as f64 / 1024.0,
            );
        }
    }
}
