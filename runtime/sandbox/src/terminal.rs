//! A process with a terminal (`process.terminal`, `exec --tty`): the pseudo-terminal is in the
//! guest; its output arrives on the process's stdout stream, keystrokes go to its stdin stream.
//! On the host the other end is either
//! - a new host pseudo-terminal whose master goes to the caller's console socket over
//!   SCM_RIGHTS (as runc's `--console-socket`), the slave relayed raw to the guest, or
//! - husk's own stdin/stdout (foreground `run`, `exec -t`), in raw mode while it lasts.
//!
//! The host end's window size is polled and copied to the guest terminal.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::agent::AgentClient;
use crate::SandboxError;

/// How often the host end's window size is looked at: often at first, when an engine sets
/// the size it read from its user's terminal and the process about to start reads it, then
/// seldom.
const RESIZE_POLL_FIRST: Duration = Duration::from_millis(10);
const RESIZE_POLL: Duration = Duration::from_millis(200);
/// How long the first, frequent polls last.
const RESIZE_FIRST: Duration = Duration::from_secs(5);

/// Where the host end of a terminal is.
#[derive(Debug, Clone)]
pub enum HostEnd {
    /// A new host terminal whose master is sent to this socket.
    ConsoleSocket(PathBuf),
    /// husk's own stdin and stdout.
    OwnStdio,
}

/// A terminal in raw mode until dropped.
#[derive(Debug)]
struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    fn enter(fd: OwnedFd) -> nix::Result<Self> {
        let saved = tcgetattr(&fd)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&fd, SetArg::TCSANOW, &raw)?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// The relays of one terminal; the output relay ends with the process's output.
#[derive(Debug)]
pub struct Relay {
    /// Copies the guest's output to the host end; bytes copied.
    pub output: JoinHandle<std::io::Result<u64>>,
    resize: JoinHandle<()>,
    _raw: Option<RawMode>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.resize.abort();
    }
}

/// Wires the guest terminal of `id` (or its exec `exec_id`), whose streams are `stdin` and
/// `stdout`, to `end`.
///
/// # Errors
/// The console socket cannot be reached or take the master, or a terminal cannot be made.
pub fn connect(
    agent: &AgentClient,
    id: &str,
    exec_id: Option<&str>,
    stdin: UnixStream,
    stdout: UnixStream,
    end: &HostEnd,
) -> Result<Relay, SandboxError> {
    let (input, output, raw): (File, File, Option<RawMode>) = match end {
        HostEnd::ConsoleSocket(socket) => {
            let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
            // The guest terminal does the line discipline; this one only carries bytes.
            let raw = RawMode::enter(pty.slave.try_clone()?).map_err(std::io::Error::from)?;
            send_master(socket, pty.master)?;
            let input = File::from(pty.slave.try_clone()?);
            (input, File::from(pty.slave), Some(raw))
        }
        HostEnd::OwnStdio => {
            let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
            let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
            let raw = nix::unistd::isatty(&stdin)
                .unwrap_or(false)
                .then(|| RawMode::enter(stdin.try_clone().ok()?).ok())
                .flatten();
            (File::from(stdin), File::from(stdout), raw)
        }
    };
    let size_source = input.try_clone()?;
    let mut to_guest = blocking(stdin)?;
    let mut input = input;
    std::thread::Builder::new()
        .name("tty-input".into())
        .spawn(move || {
            let _ = std::io::copy(&mut input, &mut to_guest);
            let _ = to_guest.shutdown(Shutdown::Write);
        })?;
    let mut from_guest = blocking(stdout)?;
    let mut output = output;
    let output = tokio::task::spawn_blocking(move || {
        let copied = std::io::copy(&mut from_guest, &mut output);
        let _ = output.flush();
        copied
    });
    let resize = tokio::spawn(forward_resizes(
        agent.uds().to_owned(),
        id.to_owned(),
        exec_id.map(str::to_owned),
        size_source,
    ));
    Ok(Relay {
        output,
        resize,
        _raw: raw,
    })
}

/// Sends `master` over the console socket at `path`, as runc (the message is the name).
fn send_master(path: &Path, master: OwnedFd) -> Result<(), SandboxError> {
    let socket = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| SandboxError::Terminal(format!("console socket {}: {e}", path.display())))?;
    let name = b"husk-console";
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&master)];
    sendmsg::<UnixAddr>(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| SandboxError::Terminal(format!("console socket {}: send: {e}", path.display())))?;
    Ok(())
}

/// Copies the host end's window size to the guest terminal whenever it changes.
async fn forward_resizes(uds: PathBuf, id: String, exec_id: Option<String>, tty: File) {
    let Ok(mut agent) = AgentClient::connect(&uds, std::time::Instant::now()).await else {
        return;
    };
    let mut last = None;
    let first_until = std::time::Instant::now() + RESIZE_FIRST;
    loop {
        if let Ok(size) = rustix::termios::tcgetwinsize(&tty) {
            let now = (size.ws_row, size.ws_col);
            if last != Some(now) && now != (0, 0) {
                if let Err(e) = agent.resize(&id, exec_id.as_deref(), now.0, now.1).await {
                    debug!(error = %e, "terminal resize not delivered; stopping");
                    return;
                }
                last = Some(now);
            }
        }
        let poll = match std::time::Instant::now() < first_until {
            true => RESIZE_POLL_FIRST,
            false => RESIZE_POLL,
        };
        tokio::time::sleep(poll).await;
    }
}

fn blocking(conn: UnixStream) -> std::io::Result<std::os::unix::net::UnixStream> {
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    Ok(conn)
}
