//! A process's stdio as containerd hands it over: FIFO paths (ctr, CRI), `file://` log files,
//! a `binary://` logger for stdout and stderr ([`crate::logger`]) or nothing, relayed to and
//! from the agent's stdio streams of the process.
//!
//! FIFOs are opened read-write, so neither side blocks on open and the shim never sees EOF or
//! EPIPE from them: stdin ends with `CloseIO` (what is left in the FIFO is still delivered),
//! outputs end with the process's streams. The exit is reported only after the outputs were
//! written out ([`Relays::delivered`]).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use husk_sandbox::agent::ProcessStreams;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::logger::{self, BinaryUri, LoggerProcess, Owner};

/// How long a logger may take to exit once its pipes are closed, then after SIGTERM.
const LOGGER_GRACE: Duration = Duration::from_secs(2);

/// Where one stream goes, from containerd's string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Not connected.
    Null,
    /// A FIFO (a plain path).
    Fifo(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
    /// `binary:///path?args`: a logger for stdout and stderr.
    Binary(BinaryUri),
}

fn target(uri: &str) -> Result<Target, String> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    match uri.split_once("://") {
        None => Ok(Target::Fifo(PathBuf::from(uri))),
        Some(("fifo", path)) => Ok(Target::Fifo(PathBuf::from(path))),
        Some(("file", path)) if path.starts_with('/') => Ok(Target::File(PathBuf::from(path))),
        Some(("binary", rest)) => Ok(Target::Binary(BinaryUri::parse(rest)?)),
        Some((scheme, _)) => Err(format!(
            "stdio {uri:?}: the {scheme}:// scheme is not supported (FIFO paths, file:// and binary:// are)"
        )),
    }
}

/// containerd's stdio of one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// stdin.
    pub stdin: String,
    /// stdout.
    pub stdout: String,
    /// stderr (unused with a terminal).
    pub stderr: String,
    /// The process has a terminal: its output comes on stdout only.
    pub terminal: bool,
}

impl StdioPaths {
    /// Checks the URIs before anything is created: stdin is a FIFO or nothing; a
    /// `binary://` logger takes both outputs, so stderr is then stdout's URI or empty.
    pub fn check(&self) -> Result<(), String> {
        match target(&self.stdin)? {
            Target::File(_) => return Err("stdin cannot be a file:// URI".into()),
            Target::Binary(_) => return Err("stdin cannot be a binary:// URI".into()),
            Target::Null | Target::Fifo(_) => {}
        }
        let stdout = target(&self.stdout)?;
        let stderr = target(&self.stderr)?;
        let shared = self.stderr.is_empty() || self.stderr == self.stdout;
        match (stdout, stderr) {
            (Target::Binary(_), _) if !shared => Err(format!(
                "stderr {:?} differs from stdout's binary:// URI {:?} (one logger takes both)",
                self.stderr, self.stdout
            )),
            (_, Target::Binary(_)) if self.stderr != self.stdout => Err(format!(
                "stderr's binary:// URI {:?} needs the same URI on stdout (one logger takes both)",
                self.stderr
            )),
            _ => Ok(()),
        }
    }
}

/// The running relays of one process.
#[derive(Debug)]
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
    logger: Option<LoggerProcess>,
}

impl Relays {
    /// Opens containerd's ends (starts the logger of a `binary://` URI, for `owner`) and
    /// starts relaying.
    ///
    /// # Errors
    /// A FIFO or file cannot be opened, a logger cannot be started or does not get ready.
    pub async fn start(
        paths: &StdioPaths,
        owner: Owner<'_>,
        streams: ProcessStreams,
    ) -> std::io::Result<Self> {
        let close_stdin = Arc::new(Notify::new());
        let input = open_input(&paths.stdin)?;
        let with_stderr = streams.stderr.is_some() && !paths.terminal;
        let (stdout, stderr, logger) = match target(&paths.stdout).map_err(std::io::Error::other)? {
            Target::Binary(uri) => {
                let logger = logger::start(&uri, owner).await?;
                // Without a stderr stream, the logger's fd 4 ends now.
                let stderr: Option<Output> = with_stderr.then(|| Box::new(logger.stderr) as _);
                (
                    Box::new(logger.stdout) as Output,
                    stderr,
                    Some(logger.process),
                )
            }
            _ => {
                let stderr = match with_stderr {
                    true => Some(open_output(&paths.stderr).await?),
                    false => None,
                };
                (open_output(&paths.stdout).await?, stderr, None)
            }
        };
        tokio::spawn(relay_stdin(input, streams.stdin, close_stdin.clone()));
        let mut outputs = vec![tokio::spawn(relay_output(streams.stdout, stdout))];
        if let (Some(from), Some(to)) = (streams.stderr, stderr) {
            outputs.push(tokio::spawn(relay_output(from, to)));
        }
        Ok(Self {
            outputs,
            close_stdin,
            logger,
        })
    }

    /// `CloseIO`: delivers what is left in the stdin FIFO, then closes the process's stdin.
    pub fn close_stdin(&self) {
        self.close_stdin.notify_one();
    }

    /// Waits until every output was written out.
    pub async fn delivered(&mut self) {
        for handle in self.outputs.drain(..) {
            let _ = handle.await;
        }
    }

    /// The process is deleted: a `binary://` logger still running after [`LOGGER_GRACE`]
    /// (its pipes are closed once the outputs are delivered or aborted) gets SIGTERM, then
    /// SIGKILL. Returns how the logger ended, if there was one.
    pub async fn release(&mut self) -> Option<ExitStatus> {
        let mut logger = self.logger.take()?;
        logger.stop(LOGGER_GRACE, LOGGER_GRACE).await
    }

    /// Stops the relays where they are (the process's VM is gone).
    pub fn abort(&mut self) {
        for handle in self.outputs.drain(..) {
            handle.abort();
        }
        self.close_stdin.notify_one();
    }
}

type Output = Box<dyn AsyncWrite + Send + Unpin>;

fn open_input(uri: &str) -> std::io::Result<Option<pipe::Receiver>> {
    match target(uri).map_err(std::io::Error::other)? {
        Target::Fifo(path) => Ok(Some(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(path)?,
        )),
        Target::Null | Target::File(_) | Target::Binary(_) => Ok(None),
    }
}

async fn open_output(uri: &str) -> std::io::Result<Output> {
    Ok(match target(uri).map_err(std::io::Error::other)? {
        Target::Null => Box::new(tokio::io::sink()),
        Target::Fifo(path) => Box::new(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path)?,
        ),
        Target::File(path) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?,
        ),
        // Only stdout's URI starts a logger: stderr shares it (`StdioPaths::check`).
        Target::Binary(_) => Box::new(tokio::io::sink()),
    })
}

/// Copies the stdin FIFO to the process until `close`, then what the FIFO still holds, then
/// ends the process's stdin.
async fn relay_stdin(input: Option<pipe::Receiver>, mut to: UnixStream, close: Arc<Notify>) {
    if let Some(mut from) = input {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if to.write_all(&buf[..n]).await.is_err() { break },
                },
                () = close.notified() => {
                    // The writer is gone: read straight from the (non-blocking) FIFO until it
                    // is empty; tokio's own try_read trusts its readiness cache instead.
                    while let Ok(n) = nix::unistd::read(&from, &mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

async fn relay_output(mut from: UnixStream, mut to: Output) {
    let copied = copy(&mut from, &mut to).await;
    let _ = to.flush().await;
    drop(to);
    if let Err(e) = &copied {
        // A logger or file that fails must not block the process on a full stream.
        warn!(error = %e, "output lost; the rest of the stream is discarded");
        let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
    }
    debug!(?copied, "output relay done");
}

async fn copy(from: &mut (impl AsyncRead + Unpin), to: &mut Output) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner<'static> = Owner {
        container_id: "c1",
        namespace: "ns",
    };

    /// The agent's ends of a process's streams, as a test drives them.
    struct Theirs {
        stdin: UnixStream,
        stdout: UnixStream,
        stderr: Option<UnixStream>,
    }

    /// Relays for `paths` over fresh socket pairs (a stderr stream when `stderr`).
    async fn relays(paths: &StdioPaths, stderr: bool) -> (Relays, Theirs) {
        let (stdin_ours, stdin) = UnixStream::pair().unwrap();
        let (stdout, stdout_ours) = UnixStream::pair().unwrap();
        let (stderr, stderr_ours) = match stderr {
            true => {
                let (theirs, ours) = UnixStream::pair().unwrap();
                (Some(theirs), Some(ours))
            }
            false => (None, None),
        };
        let streams = ProcessStreams {
            stdin: stdin_ours,
            stdout: stdout_ours,
            stderr: stderr_ours,
        };
        let relays = Relays::start(paths, OWNER, streams).await.unwrap();
        let theirs = Theirs {
            stdin,
            stdout,
            stderr,
        };
        (relays, theirs)
    }

    #[test]
    fn test_target_schemes() {
        assert_eq!(target("").unwrap(), Target::Null);
        assert_eq!(
            target("/run/fifo/1-stdout").unwrap(),
            Target::Fifo("/run/fifo/1-stdout".into())
        );
        assert_eq!(
            target("file:///var/log/c.log").unwrap(),
            Target::File("/var/log/c.log".into())
        );
        assert_eq!(
            target("binary:///usr/bin/logger?x=1").unwrap(),
            Target::Binary(BinaryUri {
                path: "/usr/bin/logger".into(),
                args: vec!["x".into(), "1".into()],
            })
        );
        assert!(target("file://relative").is_err());
        assert!(target("tcp://host:1").unwrap_err().contains("tcp://"));
    }

    #[tokio::test]
    async fn test_relays_fifo_round_trip_and_close_stdin_delivers_rest() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = |name: &str| {
            let p = dir.path().join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            p.to_string_lossy().into_owned()
        };
        let paths = StdioPaths {
            stdin: fifo("in"),
            stdout: fifo("out"),
            stderr: dir.path().join("err.log").to_string_lossy().into_owned(),
            terminal: false,
        };
        let paths = StdioPaths {
            stderr: format!("file://{}", paths.stderr),
            ..paths
        };
        let (mut relays, theirs) = relays(&paths, true).await;
        let (mut stdin_theirs, mut stdout_theirs) = (theirs.stdin, theirs.stdout);
        let mut stderr_theirs = theirs.stderr.unwrap();
        // containerd's side: writes stdin, reads stdout.
        let mut writer = pipe::OpenOptions::new().open_sender(&paths.stdin).unwrap();
        writer.write_all(b"to the process").await.unwrap();
        drop(writer);
        relays.close_stdin();
        let mut got = Vec::new();
        stdin_theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"to the process");

        let mut reader = pipe::OpenOptions::new()
            .open_receiver(&paths.stdout)
            .unwrap();
        stdout_theirs.write_all(b"out").await.unwrap();
        drop(stdout_theirs);
        stderr_theirs.write_all(b"err").await.unwrap();
        drop(stderr_theirs);
        relays.delivered().await;
        let mut out = [0u8; 3];
        reader.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"out");
        let log = std::fs::read(dir.path().join("err.log")).unwrap();
        assert_eq!(log, b"err");
    }

    #[test]
    fn test_binary_logger_takes_both_outputs() {
        let paths = |stdout: &str, stderr: &str| StdioPaths {
            stdin: String::new(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal: false,
        };
        let logger = "binary:///bin/logger?a=1";
        assert!(paths(logger, logger).check().is_ok());
        assert!(paths(logger, "").check().is_ok());
        assert!(paths(logger, "/run/fifo").check().is_err());
        assert!(paths("/run/fifo", logger).check().is_err());
        let stdin_logger = StdioPaths {
            stdin: logger.into(),
            ..paths("", "")
        };
        assert!(stdin_logger.check().is_err());
    }

    /// A real logger (a shell script, as containerd's docs show one): it gets the query as
    /// arguments, the owner in its environment, the outputs on fds 3 and 4, and closes fd 5.
    #[tokio::test]
    async fn test_binary_logger_receives_outputs_args_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("log");
        let script = dir.path().join("logger");
        let draft = dir.path().join("logger.txt");
        std::fs::write(
            &draft,
            format!(
                "#!/bin/sh\necho \"$* $CONTAINER_ID $CONTAINER_NAMESPACE\" > {out}.meta\n\
                 exec 5>&-\ncat <&3 > {out}.out & cat <&4 > {out}.err\nwait\n",
                out = out.display()
            ),
        )
        .unwrap();
        // Written by a child process: a descriptor open for writing in this process would be
        // inherited by another test's fork for a moment, and exec would fail with ETXTBSY.
        let copied = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&draft)
            .arg(&script)
            .status()
            .unwrap();
        assert!(copied.success());
        let uri = format!("binary://{}?k=v&flag", script.display());
        let paths = StdioPaths {
            stdin: String::new(),
            stdout: uri.clone(),
            stderr: uri,
            terminal: false,
        };
        paths.check().unwrap();
        let (mut relays, theirs) = relays(&paths, true).await;
        let mut stdout_theirs = theirs.stdout;
        let mut stderr_theirs = theirs.stderr.unwrap();
        stdout_theirs.write_all(b"out").await.unwrap();
        stderr_theirs.write_all(b"err").await.unwrap();
        drop((stdout_theirs, stderr_theirs));
        relays.delivered().await;
        let status = relays.release().await.expect("the logger was reaped");
        assert!(status.success(), "{status}");
        let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", out.display())).unwrap();
        assert_eq!(read("meta"), "k v flag  c1 ns\n");
        assert_eq!(read("out"), "out");
        assert_eq!(read("err"), "err");
    }

    #[tokio::test]
    async fn test_binary_logger_missing_is_an_error_and_one_that_dies_loses_only_output() {
        let missing = BinaryUri::parse("/nonexistent/logger").unwrap();
        let e = logger::start(&missing, OWNER).await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/logger"), "{e}");

        // A logger that exits at once (fd 5 closes with it, as containerd takes it: ready):
        // the process's output is read and discarded, never left to block the process.
        let paths = StdioPaths {
            stdin: String::new(),
            stdout: "binary:///bin/false".into(),
            stderr: String::new(),
            terminal: false,
        };
        let (mut relays, theirs) = relays(&paths, false).await;
        let mut stdout_theirs = theirs.stdout;
        let status = relays.release().await.expect("the logger was reaped");
        assert!(!status.success());
        stdout_theirs.write_all(&[b'x'; 1 << 20]).await.unwrap();
        drop(stdout_theirs);
        relays.delivered().await;
    }
}
