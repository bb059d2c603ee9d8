//! Relays between husk's own stdio and the container's stdio connections.
//!
//! Each relay is a blocking copy on a thread of its own: the connection gives vsock credit
//! backpressure, the host side blocks as a pipe or terminal does, and nothing is buffered
//! beyond one copy buffer.

use std::io::{Read, Write};
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
    std::thread::Builder::new()
        .name("stdin-relay".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut conn);
            let _ = conn.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

/// Copies `conn` to husk's `target` until the agent ends the stream; yields bytes copied.
///
/// # Errors
/// When `conn` cannot be made blocking.
pub fn relay_output(
    conn: UnixStream,
    target: HostOutput,
) -> std::io::Result<JoinHandle<std::io::Result<u64>>> {
    let mut conn = into_blocking(conn)?;
    Ok(tokio::task::spawn_blocking(move || {
        let copied = match target {
            HostOutput::Stdout => copy_chunks(&mut conn, &std::io::stdout()),
            HostOutput::Stderr => copy_chunks(&mut conn, &std::io::stderr()),
        };
        let _ = conn.shutdown(Shutdown::Both);
        copied
    }))
}

/// Size of one relayed chunk.
const CHUNK: usize = 64 * 1024;

/// Copies `from` to `to` chunk by chunk, taking the output's lock only to write (never while
/// waiting for the guest: husk's own log lines go to the same stderr) and flushing each chunk.
fn copy_chunks<W>(from: &mut impl Read, to: &W) -> std::io::Result<u64>
where
    for<'a> &'a W: Write,
{
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut out = to;
        out.write_all(&buf[..n])?;
        out.flush()?;
        total += n as u64;
    }
}
