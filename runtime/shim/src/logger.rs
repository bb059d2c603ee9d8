//! containerd's binary logging protocol (shim v2 "logging"; what the runc shim of containerd
//! 1.6 does in `pkg/process/io.go`): for a stdout URI `binary:///path/to/logger?k=v&k2` the
//! shim starts `/path/to/logger k v k2 ""` (each query key, then its first value, empty when
//! it has none) with only `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment and
//! three more descriptors: fd 3 reads the process's stdout, fd 4 its stderr, fd 5 is the
//! write end of a readiness pipe. The logger closes fd 5 (or writes to it) once it is ready;
//! only then does the shim go on, and it writes the process's output into the two pipes and
//! closes them when the streams end. The logger sees EOF and exits; a task reaps it, and
//! deleting the process stops one that is still there ([`LoggerProcess::stop`]).

use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long a logger may take to report ready, as containerd's `binaryIOProcStartTimeout`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `binary://` URI: the logger and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryUri {
    /// The logger's absolute path.
    pub path: PathBuf,
    /// Its arguments, from the query.
    pub args: Vec<String>,
}

impl BinaryUri {
    /// Parses what follows `binary://`: an empty host, an absolute path, an optional query
    /// (`&`-separated `key[=value]`, percent-encoded, `+` for a space; a repeated key keeps its
    /// first value). The arguments keep the query's order, where containerd's follow Go's map
    /// order (unspecified).
    ///
    /// # Errors
    /// A host, a relative or empty path, a path or query that is not UTF-8 once decoded.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') || path.len() < 2 {
            return Err(format!(
                "binary://{rest}: expected binary:///absolute/path/to/logger[?args]"
            ));
        }
        let path = PathBuf::from(decode(path, false)?);
        let mut keys: Vec<String> = Vec::new();
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key, true)?;
            if key.is_empty() || keys.contains(&key) {
                continue;
            }
            keys.push(key.clone());
            args.push(key);
            args.push(decode(value, true)?);
        }
        Ok(Self { path, args })
    }
}

/// Percent-decodes `s` (and `+` as a space in a query).
fn decode(s: &str, query: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("{s:?}: bad percent-encoding"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?}: not UTF-8 once decoded"))
}

/// Whose output a logger receives: its environment.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// `CONTAINER_ID`.
    pub container_id: &'a str,
    /// `CONTAINER_NAMESPACE`: containerd's namespace.
    pub namespace: &'a str,
}

/// A started logger: the write ends of its stdout and stderr pipes, and the process.
#[derive(Debug)]
pub struct Logger {
    /// Into the logger's fd 3.
    pub stdout: pipe::Sender,
    /// Into the logger's fd 4.
    pub stderr: pipe::Sender,
    /// The logger itself.
    pub process: LoggerProcess,
}

/// Starts the logger of `uri` for `owner` and waits until it is ready.
///
/// # Errors
/// The pipes cannot be made, the logger cannot be started, it does not get ready within
/// [`READY_TIMEOUT`] (it is killed then).
pub async fn start(uri: &BinaryUri, owner: Owner<'_>) -> io::Result<Logger> {
    let context = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("start logger {}: {e}", uri.path.display()),
        )
    };
    let (stdout, stdout_rx) = pipe::pipe()?;
    let (stderr, stderr_rx) = pipe::pipe()?;
    let (ready_tx, mut ready) = pipe::pipe()?;
    let mappings = vec![
        mapping(stdout_rx.into_blocking_fd()?, 3),
        mapping(stderr_rx.into_blocking_fd()?, 4),
        mapping(ready_tx.into_blocking_fd()?, 5),
    ];
    let mut cmd = Command::new(&uri.path);
    cmd.args(&uri.args)
        .env_clear()
        .env("CONTAINER_ID", owner.container_id)
        .env("CONTAINER_NAMESPACE", owner.namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd.fd_mappings(mappings).map_err(io::Error::other)?;
    let child = cmd.spawn().map_err(context)?;
    // The command holds our copies of the child's ends: fd 5's EOF must come from the
    // logger alone.
    drop(cmd);
    let mut process = LoggerProcess::reap(child);
    let mut byte = [0u8; 1];
    let failed = match tokio::time::timeout(READY_TIMEOUT, ready.read(&mut byte)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(context(e)),
        Err(_) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "logger {} not ready (fd 5 still open) after {READY_TIMEOUT:?}",
                uri.path.display()
            ),
        )),
    };
    if let Some(e) = failed {
        process.stop(Duration::ZERO, Duration::ZERO).await;
        return Err(e);
    }
    debug!(logger = %uri.path.display(), pid = ?process.pid, "binary logger ready");
    Ok(Logger {
        stdout,
        stderr,
        process,
    })
}

fn mapping(parent_fd: std::os::fd::OwnedFd, child_fd: i32) -> FdMapping {
    FdMapping {
        parent_fd,
        child_fd,
    }
}

/// A logger process, reaped by a task of its own.
#[derive(Debug)]
pub struct LoggerProcess {
    pid: Option<u32>,
    /// Signals for the reaper to deliver; dropping it kills the logger.
    signals: Option<mpsc::UnboundedSender<Signal>>,
    reaped: Option<JoinHandle<Option<ExitStatus>>>,
}

impl LoggerProcess {
    fn reap(mut child: Child) -> Self {
        let pid = child.id();
        let (signals, mut rx) = mpsc::unbounded_channel::<Signal>();
        let reaped = tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    signal = rx.recv() => match (signal, child.id()) {
                        (Some(signal), Some(pid)) if signal != Signal::SIGKILL => {
                            if let Ok(pid) = i32::try_from(pid) {
                                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                            }
                        }
                        _ => {
                            let _ = child.start_kill();
                            break child.wait().await;
                        }
                    },
                }
            };
            match &status {
                Ok(s) => debug!(pid, status = %s, "binary logger exited"),
                Err(e) => warn!(pid, error = %e, "binary logger lost"),
            }
            status.ok()
        });
        Self {
            pid,
            signals: Some(signals),
            reaped: Some(reaped),
        }
    }

    /// The process is gone: gives the logger `eof_grace` to exit by itself (its pipes are
    /// closed), then sends SIGTERM (as containerd does) and after `term_grace` SIGKILL.
    /// Returns how it ended, `None` when that is unknown or was already returned.
    pub async fn stop(&mut self, eof_grace: Duration, term_grace: Duration) -> Option<ExitStatus> {
        let mut reaped = self.reaped.take()?;
        let signals = self.signals.take();
        for (grace, signal) in [(eof_grace, Signal::SIGTERM), (term_grace, Signal::SIGKILL)] {
            if let Ok(done) = tokio::time::timeout(grace, &mut reaped).await {
                return done.ok().flatten();
            }
            warn!(pid = self.pid, %signal, "binary logger still running after its streams ended");
            if let Some(signals) = &signals {
                let _ = signals.send(signal);
            }
        }
        reaped.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binary_uri_query_gives_key_then_first_value() {
        let uri = BinaryUri::parse("/usr/bin/my%20logger?--a=1&--b&--a=2&c=x+y%26z").unwrap();
        assert_eq!(uri.path, PathBuf::from("/usr/bin/my logger"));
        assert_eq!(uri.args, ["--a", "1", "--b", "", "c", "x y&z"]);
    }

    #[test]
    fn test_binary_uri_without_absolute_path_is_refused() {
        assert!(BinaryUri::parse("host/logger").is_err());
        assert!(BinaryUri::parse("/").is_err());
        assert!(BinaryUri::parse("/x?k=%zz").is_err());
        assert_eq!(BinaryUri::parse("/x").unwrap().args, Vec::<String>::new());
    }
}
