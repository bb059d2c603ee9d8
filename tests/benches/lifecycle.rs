//! `make bench`, issue 4's targets: `create` + `start` until the process runs, `exec` latency
//! in a running container, and `state` / `list` with 50 containers, husk next to runc on the
//! same busybox bundle in the same run. Medians of our own timings; `state` and `list` also
//! through criterion.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use husk_e2e::harness::{median, Env, Husk, TestBundle};

const RUNS: usize = 10;
/// Containers alive while `state` and `list` are timed.
const MANY: usize = 50;

struct Runtime<'a> {
    name: &'static str,
    husk: Option<&'a Husk>,
    runc_root: &'a std::path::Path,
}

impl Runtime<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match self.husk {
            Some(h) => h.command(args),
            None => {
                let mut cmd = Command::new("runc");
                cmd.arg("--root").arg(self.runc_root).args(args);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn ok(&self, args: &[&str]) {
        let status = self.command(args).status().expect("spawn");
        assert!(status.success(), "{} {args:?}: {status}", self.name);
    }

    fn timed(&self, args: &[&str]) -> Duration {
        let t = Instant::now();
        self.ok(args);
        t.elapsed()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let Some(env) = Env::get("lifecycle bench") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sleep", "600"]);
    bundle.edit(|c| c["process"]["terminal"] = false.into());
    let b = bundle.path().to_str().expect("utf-8").to_owned();
    let runc_root = tempfile::tempdir().expect("runc root");
    let runtimes = [
        Runtime {
            name: "runc",
            husk: None,
            runc_root: runc_root.path(),
        },
        Runtime {
            name: "husk",
            husk: Some(&husk),
            runc_root: runc_root.path(),
        },
    ];
    println!("\nlifecycle, medians of {RUNS} runs (husk: QEMU door as `auto` picks here):");
    println!(
        "{:<8} {:>22} {:>16}",
        "", "create+start (ms)", "exec true (ms)"
    );
    let mut rows = Vec::new();
    for rt in &runtimes {
        let mut starts = Vec::new();
        let mut execs = Vec::new();
        for i in 0..RUNS {
            let id = format!("b{i}");
            let t = Instant::now();
            rt.ok(&["create", "--bundle", &b, &id]);
            rt.ok(&["start", &id]);
            starts.push(t.elapsed());
            execs.push(rt.timed(&["exec", &id, "true"]));
            rt.ok(&["delete", "--force", &id]);
        }
        let row = (median(starts), median(execs));
        println!("{:<8} {:>22.1} {:>16.1}", rt.name, ms(row.0), ms(row.1));
        rows.push(row);
    }
    println!(
        "{:<8} {:>21.1}x {:>15.1}x",
        "husk/runc",
        ms(rows[1].0) / ms(rows[0].0),
        ms(rows[1].1) / ms(rows[0].1)
    );

    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    println!("\nstate and list with {MANY} created containers each:");
    for rt in &runtimes {
        let mut memory = vec![];
        if rt.husk.is_some() {
            memory = vec!["--memory", "64"];
        }
        for i in 0..MANY {
            let id = format!("m{i}");
            let mut args = vec!["create"];
            args.extend(memory.iter().copied());
            args.extend(["--bundle", &b, &id]);
            rt.ok(&args);
        }
        let state: Vec<Duration> = (0..RUNS).map(|_| rt.timed(&["state", "m7"])).collect();
        let list: Vec<Duration> = (0..RUNS).map(|_| rt.timed(&["list"])).collect();
        println!(
            "{:<8} state {:>6.1} ms   list {:>6.1} ms (process start included)",
            rt.name,
            ms(median(state)),
            ms(median(list))
        );
        let mut group = criterion.benchmark_group(format!("{MANY} containers"));
        group.bench_function(format!("{} state", rt.name), |bench| {
            bench.iter(|| rt.ok(&["state", "m7"]));
        });
        group.bench_function(format!("{} list", rt.name), |bench| {
            bench.iter(|| rt.ok(&["list"]));
        });
        group.finish();
        for i in 0..MANY {
            rt.ok(&["delete", "--force", &format!("m{i}")]);
        }
    }
    husk.assert_clean();
}
