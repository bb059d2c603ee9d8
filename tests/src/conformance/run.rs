//! One validation test under one runtime: a fresh directory per run (the runtime's state root,
//! `TMPDIR` for the bundles, a wrapper the suite calls as `RUNTIME`), the test in its own mount
//! namespace and process group with a deadline, then the cleanup of what it left.
//!
//! The suite calls `$RUNTIME <command> ...` with no global flags; the wrapper adds `--root` so
//! that each run's containers are listed and deleted without touching any other user's.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::cleanup;
use super::tap::{Exit, Tap, Verdict};

/// A runtime the suite is run against.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Its name in the report (`runc`, `husk`).
    pub name: String,
    /// Its binary.
    pub binary: PathBuf,
    /// How long one test may take under it.
    pub timeout: Duration,
}

/// The suite's source root, where every test must run from.
#[derive(Debug, Clone)]
pub struct Suite {
    /// `runtime-tools/` with the built `validation/<name>/<name>.t` and `runtimetest`.
    pub root: PathBuf,
    /// Where each run's TAP and stderr are kept (`<runtime>/<test>.{tap,stderr}`).
    pub logs: PathBuf,
}

/// One test run's outcome.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Pass, or the first failure.
    pub verdict: Verdict,
    /// Wall time of the test program.
    pub elapsed: Duration,
}

impl Suite {
    /// The names of the suite's built tests, sorted.
    ///
    /// # Errors
    /// When `validation/` cannot be read.
    pub fn tests(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.root.join("validation"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if self.program(&name).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn program(&self, test: &str) -> PathBuf {
        self.root
            .join("validation")
            .join(test)
            .join(format!("{test}.t"))
    }

    /// Runs `test` under `runtime` and cleans up after it.
    ///
    /// # Errors
    /// When the run's directory, the wrapper or the logs cannot be written, or the test
    /// program cannot be spawned: the harness is broken, not the runtime.
    pub fn run(&self, test: &str, runtime: &Runtime) -> std::io::Result<RunResult> {
        // Short and under /tmp whatever TMPDIR says: husk puts Unix sockets under its state
        // root, and the suite's container ids are 36-character UUIDs.
        let dir = tempfile::Builder::new()
            .prefix(&format!("conf-{}-", runtime.name))
            .tempdir_in("/tmp")?;
        let state_root = dir.path().join("root");
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&state_root)?;
        fs::create_dir_all(&tmp)?;
        let wrapper = write_wrapper(dir.path(), &runtime.binary, &state_root)?;
        let logs = self.logs.join(&runtime.name);
        fs::create_dir_all(&logs)?;
        let tap_path = logs.join(format!("{test}.tap"));
        let stderr_path = logs.join(format!("{test}.stderr"));

        let started = Instant::now();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "slave"])
            .arg(self.program(test))
            .current_dir(&self.root)
            .env("RUNTIME", &wrapper)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(File::create(&tap_path)?)
            .stderr(File::create(&stderr_path)?)
            .process_group(0)
            .spawn()?;
        let exit = wait_deadline(child, runtime.timeout)?;
        let elapsed = started.elapsed();

        cleanup::run_leftovers(&wrapper, dir.path());
        let tap = Tap::parse(&String::from_utf8_lossy(&fs::read(&tap_path)?));
        let stderr = String::from_utf8_lossy(&fs::read(&stderr_path)?).into_owned();
        let hint = error_hint(&stderr, &tmp);
        Ok(RunResult {
            verdict: tap.verdict(exit, hint.as_deref()),
            elapsed,
        })
    }
}

/// The runtime's error from a test's stderr: its last line that is not the suite's own
/// `exit status N`, runc's `msg="..."` taken out of its log line, the run's bundle paths
/// (`<tmp>/ocitestNNN`) shortened to `<bundle>`, at most [`HINT_CHARS`] kept from its end.
fn error_hint(stderr: &str, tmp: &Path) -> Option<String> {
    let line = stderr
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !l.starts_with("exit status"))?;
    let line = match line.split_once("msg=\"") {
        Some((_, msg)) => msg.trim_end_matches('"'),
        None => line,
    };
    let prefix = format!("{}/", tmp.display());
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find(&prefix) {
        out.push_str(&rest[..at]);
        out.push_str("<bundle>");
        let after = &rest[at + prefix.len()..];
        rest = after.find('/').map_or("", |slash| &after[slash..]);
    }
    out.push_str(rest);
    Some(tail(&out, HINT_CHARS))
}

/// Longest hint kept: its end, where an error chain (outer: inner: cause) names the cause.
const HINT_CHARS: usize = 80;

/// The last `max` characters of `s`, an ellipsis first when cut.
fn tail(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_owned();
    }
    let mut out = String::from("…");
    out.extend(s.chars().skip(count.saturating_sub(max.saturating_sub(1))));
    out
}

/// `<dir>/runtime`: `exec <binary> --root <state_root> "$@"`.
fn write_wrapper(dir: &Path, binary: &Path, state_root: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("runtime");
    let script = format!(
        "#!/bin/sh\nexec '{}' --root '{}' \"$@\"\n",
        binary.display(),
        state_root.display()
    );
    fs::write(&path, script)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Waits for `child` until `timeout`; past it, kills the child's whole process group.
///
/// # Errors
/// When waiting fails.
pub fn wait_deadline(mut child: Child, timeout: Duration) -> std::io::Result<Exit> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(match (status.code(), status.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Code(-1),
            });
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            child.wait()?;
            return Ok(Exit::TimedOut {
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_error_hint_shortens_bundle_paths() {
        let stderr = "failed to create the container\nhusk: invalid bundle config \
                      /tmp/r/tmp/ocitest12/config.json: linux.devices refused\nexit status 1\n";
        assert_eq!(
            error_hint(stderr, Path::new("/tmp/r/tmp")).as_deref(),
            Some("husk: invalid bundle config <bundle>/config.json: linux.devices refused")
        );
    }

    #[test]
    fn test_error_hint_long_keeps_the_end() {
        let stderr = format!(
            "husk: {}: option \"mode=755\" is not supported\n",
            "x".repeat(200)
        );
        let hint = error_hint(&stderr, Path::new("/tmp/r/tmp")).expect("hint");
        assert_eq!(hint.chars().count(), HINT_CHARS);
        assert!(hint.starts_with('…') && hint.ends_with("\"mode=755\" is not supported"));
    }

    #[test]
    fn test_error_hint_takes_runc_msg() {
        let stderr = "time=\"x\" level=error msg=\"runc create failed: bad rlimit\"\n";
        assert_eq!(
            error_hint(stderr, Path::new("/tmp/r/tmp")).as_deref(),
            Some("runc create failed: bad rlimit")
        );
    }
}
