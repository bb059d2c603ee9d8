//! A process's stdio as containerd hands it over: FIFO paths (ctr, CRI), `file://` log files
//! or nothing, relayed to and from the agent's stdio streams of the process.
//!
//! FIFOs are opened read-write, so neither side blocks on open and the shim never sees EOF or
//! EPIPE from them: stdin ends with `CloseIO` (what is left in the FIFO is still delivered),
//! outputs end with the process's streams. The exit is reported only after the outputs were
//! written out ([`Relays::delivered`]).

use std::path::PathBuf;
use std::sync::Arc;

use husk_sandbox::agent::ProcessStreams;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::debug;

/// Where one stream goes, from containerd's string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Not connected.
    Null,
    /// A FIFO (a plain path).
    Fifo(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
}

fn target(uri: &str) -> Result<Target, String> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    match uri.split_once("://") {
        None => Ok(Target::Fifo(PathBuf::from(uri))),
        Some(("fifo", path)) => Ok(Target::Fifo(PathBuf::from(path))),
        Some(("file", path)) if path.starts_with('/') => Ok(Target::File(PathBuf::from(path))),
        Some((scheme, _)) => Err(format!(
            "stdio {uri:?}: the {scheme}:// scheme is not supported (FIFO paths and file:// are)"
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
    /// Checks the URIs before anything is created.
    pub fn check(&self) -> Result<(), String> {
        target(&self.stdin)?;
        target(&self.stdout)?;
        target(&self.stderr)?;
        if matches!(target(&self.stdin)?, Target::File(_)) {
            return Err("stdin cannot be a file:// URI".into());
        }
        Ok(())
    }
}

/// The running relays of one process.
#[derive(Debug)]
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
}

impl Relays {
    /// Opens containerd's ends and starts relaying.
    ///
    /// # Errors
    /// A FIFO or file cannot be opened.
    pub async fn start(paths: &StdioPaths, streams: ProcessStreams) -> std::io::Result<Self> {
        let close_stdin = Arc::new(Notify::new());
        let input = open_input(&paths.stdin)?;
        let stdout = open_output(&paths.stdout).await?;
        let stderr = match (&streams.stderr, paths.terminal) {
            (Some(_), false) => Some(open_output(&paths.stderr).await?),
            _ => None,
        };
        tokio::spawn(relay_stdin(input, streams.stdin, close_stdin.clone()));
        let mut outputs = vec![tokio::spawn(relay_output(streams.stdout, stdout))];
        if let (Some(from), Some(to)) = (streams.stderr, stderr) {
            outputs.push(tokio::spawn(relay_output(from, to)));
        }
        Ok(Self {
            outputs,
            close_stdin,
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
        Target::Null | Target::File(_) => Ok(None),
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
        assert!(target("binary:///usr/bin/logger?x=1")
            .unwrap_err()
            .contains("binary://"));
        assert!(target("file://relative").is_err());
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
        let (stdin_ours, mut stdin_theirs) = UnixStream::pair().unwrap();
        let (mut stdout_theirs, stdout_ours) = UnixStream::pair().unwrap();
        let (mut stderr_theirs, stderr_ours) = UnixStream::pair().unwrap();
        let mut relays = Relays::start(
            &paths,
            ProcessStreams {
                stdin: stdin_ours,
                stdout: stdout_ours,
                stderr: Some(stderr_ours),
            },
        )
        .await
        .unwrap();
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
}
