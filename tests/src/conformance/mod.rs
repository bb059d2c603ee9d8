//! The OCI runtime-tools validation suite (`make conformance`) run under runc and husk, side
//! by side.
//!
//! `tests/conformance/suite.sh` builds the suite once into a cache; the `conformance` binary
//! then runs every `validation/<name>/<name>.t` under runc and then under husk, each in its own
//! mount namespace with a deadline and cleanup ([`run`], [`cleanup`]), judges each run from its
//! TAP output and exit status ([`tap`]), and prints one line per test and a summary
//! ([`report`]). Tests that create cgroups (`linux_cgroups_*`, `delete_*resources`) never run
//! next to another test: they share the fixed `cgrouptest` names.

pub mod cleanup;
pub mod report;
pub mod run;
pub mod tap;

use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use report::{Row, Summary};
pub use run::{RunResult, Runtime, Suite};

use tap::Verdict;

/// Whether `test` creates cgroups with the suite's fixed names.
fn uses_cgroups(test: &str) -> bool {
    test.starts_with("linux_cgroups_")
        || (test.starts_with("delete_") && test.ends_with("resources"))
}

/// One (test, runtime) pair to run; `runtime` indexes the runtimes given to [`run_all`].
#[derive(Debug, Clone)]
struct Job {
    index: usize,
    test: String,
    runtime: usize,
}

type Outcome = (Job, std::io::Result<RunResult>);

/// Every test's row and the time each runtime's runs took in total (runc, husk).
#[derive(Debug, Clone)]
pub struct Results {
    /// One row per test, in test order.
    pub rows: Vec<Row>,
    /// Summed wall time of the test programs under runc and under husk.
    pub elapsed: [Duration; 2],
}

/// Runs each of `tests` under each runtime of `[runc, husk]` with `jobs` runs at a time,
/// printing each test's line as soon as it and every test before it are done.
///
/// # Errors
/// When a run could not be set up (see [`Suite::run`]).
pub fn run_all(
    suite: &Suite,
    tests: &[String],
    runtimes: &[Runtime; 2],
    jobs: usize,
) -> std::io::Result<Results> {
    let queue: Vec<Job> = tests
        .iter()
        .enumerate()
        .flat_map(|(index, test)| {
            (0..2).map(move |runtime| Job {
                index,
                test: test.clone(),
                runtime,
            })
        })
        .collect();
    let queue = Arc::new(Mutex::new(queue.into_iter()));
    let cgroups = Arc::new(RwLock::new(()));
    let (tx, rx) = mpsc::channel::<Outcome>();
    for _ in 0..jobs.max(1) {
        let (queue, cgroups, tx) = (queue.clone(), cgroups.clone(), tx.clone());
        let (suite, runtimes) = (suite.clone(), runtimes.clone());
        std::thread::spawn(move || loop {
            let Some(job) = queue.lock().ok().and_then(|mut q| q.next()) else {
                return;
            };
            let result = if uses_cgroups(&job.test) {
                let _only = cgroups.write();
                suite.run(&job.test, &runtimes[job.runtime])
            } else {
                let _shared = cgroups.read();
                suite.run(&job.test, &runtimes[job.runtime])
            };
            if tx.send((job, result)).is_err() {
                return;
            }
        });
    }
    drop(tx);
    collect(tests, rx)
}

/// Receives every outcome, printing rows in test order as they complete.
fn collect(tests: &[String], rx: mpsc::Receiver<Outcome>) -> std::io::Result<Results> {
    let mut verdicts: Vec<[Option<Verdict>; 2]> = vec![[None, None]; tests.len()];
    let mut rows = Vec::with_capacity(tests.len());
    let mut elapsed = [Duration::ZERO; 2];
    for (job, result) in rx {
        let result = result?;
        if let Some(total) = elapsed.get_mut(job.runtime) {
            *total += result.elapsed;
        }
        let slot = verdicts
            .get_mut(job.index)
            .and_then(|v| v.get_mut(job.runtime));
        if let Some(slot) = slot {
            *slot = Some(result.verdict);
        }
        while let Some([Some(runc), Some(husk)]) = verdicts.get(rows.len()).cloned() {
            let row = Row {
                test: tests.get(rows.len()).cloned().unwrap_or_default(),
                runc,
                husk,
            };
            println!("{}", row.line());
            rows.push(row);
        }
    }
    Ok(Results { rows, elapsed })
}
