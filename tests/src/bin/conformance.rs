//! `conformance SUITE_ROOT`: the OCI runtime-tools validation suite under runc and husk (see
//! `husk_e2e::conformance`); `make conformance` builds the suite and calls this.
//!
//! Prints one line per test and the summary, writes the table to `$HUSK_OUT/conformance.md`
//! and each run's TAP and stderr under `$HUSK_OUT/conformance-logs/<runtime>/`. Exits 0
//! whatever the verdicts, 1 when husk passes fewer than `CONFORMANCE_MIN_HUSK`, 2 when the
//! harness itself fails. `CONFORMANCE_TESTS=a,b` runs only those tests; `CONFORMANCE_JOBS=N`
//! runs N tests at a time (default 1); `RUNC` picks the runc binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use husk_e2e::conformance::{self, report, Runtime, Suite, Summary};
use husk_e2e::harness::{husk_out, Env};

/// Per-test deadline under runc (its slowest tests poll for 10 s).
const RUNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-test deadline under husk: a VM boots per container (about 1.5 s under TCG here, 6 s
/// for a whole create-validate-delete cycle), and linux_cgroups_cpus makes 17 containers
/// (about 110 s).
const HUSK_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let Some(env) = Env::get("conformance") else {
        return ExitCode::SUCCESS;
    };
    match run(&env) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conformance: harness failed: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(env: &Env) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: conformance SUITE_ROOT")?;
    let out = husk_out();
    let suite = Suite {
        root,
        logs: out.join("conformance-logs"),
    };
    let _ = std::fs::remove_dir_all(&suite.logs);
    let tests = selected(suite.tests()?);
    if tests.is_empty() {
        return Err(format!("no built tests under {}", suite.root.display()).into());
    }
    let runtimes = [
        Runtime {
            name: "runc".into(),
            binary: runc()?,
            timeout: RUNC_TIMEOUT,
        },
        Runtime {
            name: "husk".into(),
            binary: env.husk.clone(),
            timeout: HUSK_TIMEOUT,
        },
    ];
    let jobs = env_number("CONFORMANCE_JOBS")?.unwrap_or(1);
    let started = Instant::now();
    let results = conformance::run_all(&suite, &tests, &runtimes, jobs)?;
    let summary = Summary::of(&results.rows);
    println!("{}", summary.line());
    let [runc_time, husk_time] = results.elapsed;
    println!(
        "conformance: took {} s (tests under runc {} s, under husk {} s)",
        started.elapsed().as_secs(),
        runc_time.as_secs(),
        husk_time.as_secs()
    );
    std::fs::write(out.join("conformance.md"), report::markdown(&results.rows))?;
    match env_number("CONFORMANCE_MIN_HUSK")? {
        Some(min) if summary.husk < min => {
            println!(
                "conformance: husk passed {} < CONFORMANCE_MIN_HUSK={min}",
                summary.husk
            );
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `tests`, or those of them `CONFORMANCE_TESTS` (comma-separated) names.
fn selected(tests: Vec<String>) -> Vec<String> {
    match std::env::var("CONFORMANCE_TESTS") {
        Ok(only) if !only.trim().is_empty() => {
            let only: Vec<&str> = only.split(',').map(str::trim).collect();
            tests
                .into_iter()
                .filter(|t| only.contains(&t.as_str()))
                .collect()
        }
        _ => tests,
    }
}

/// `$RUNC`, else runc on PATH or in /usr/sbin.
fn runc() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("RUNC") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .ok_or_else(|| "runc is not installed; run `make deps`".to_owned())
}

fn env_number(name: &str) -> Result<Option<usize>, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v} is not a number")),
        _ => Ok(None),
    }
}
