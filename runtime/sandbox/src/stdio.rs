//! Relays between husk's own stdio and the container's stdio connections.
//!
//! Each relay is a blocking copy on a thread of its own: the connection gives vsock credit
//! backpressure, the host side blocks as a pipe or terminal does, and nothing is buffered
//! beyond one copy buffer.

use std::io::Write;
use std::net::Shutdown;

use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// Which of husk's outputs a container stream goes to.
#[derive(Debug, Clone, Copy)]
pub enum HostOutput {
    /// husk's stdout.
    Stdout,
    /// husk's stderr.
    Stderr,
}

fn into_blocking(conn: UnixStream) -> std::io::Result<std::os::unix::net::UnixStream> {
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    Ok(conn)
}

/// Copies husk's stdin into `conn` and then shuts its write side, on a detached thread: a
/// read of a terminal can block forever, and must not keep husk from exiting.
///
/// # Errors
/// When `conn` cannot be made blocking.
pub fn relay_stdin(conn: UnixStream) -> std::io::Result<()> {
    let mut conn = into_blocking(conn)?;
    std::thread::Builder::new().name("stdin-relay".into()).spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut conn);
        let _ = conn.shutdown(Shutdown::Write);
    })?;
    Ok(())
}

/// Copies `conn` to husk's `target` until the agent ends the stream; yields bytes copied.
///
/// # Errors
/// When `conn` cannot be made blocking.
pub fn relay_output(conn: UnixStream, target: HostOutput) -> std::io::Result<JoinHandle<std::io::Result<u64>>> {
    let mut conn = into_blocking(conn)?;
    Ok(tokio::task::spawn_blocking(move || {
        let copied = match target {
            HostOutput::Stdout => copy_flush(&mut conn, &mut std::io::stdout().lock()),
            HostOutput::Stderr => copy_flush(&mut conn, &mut std::io::stderr().lock()),
        };
        let _ = conn.shutdown(Shutdown::Both);
        copied
    }))
}

fn copy_flush(from: &mut impl std::io::Read, to: &mut impl Write) -> std::io::Result<u64> {
    let n = std::io::copy(from, to)?;
    to.flush()?;
    Ok(n)
}
