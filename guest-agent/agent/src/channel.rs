//! The channel to the host: vsock, or on the QEMU door (kernel command line
//! `husk.channel=serial`) husk's stream multiplexer over the virtio-serial port named
//! [`PORT_NAME`] (`husk_protocol::mux`: QEMU can save and restore virtio-serial, not its
//! vhost-user vsock device).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use husk_protocol::mux::{MuxStream, Session};
use husk_protocol::{AGENT_PORT, SAVE_PORT};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// The virtio-serial port QEMU names for the agent (`virtserialport,name=...`).
pub const PORT_NAME: &str = "husk.agent";
/// How long the port may take to appear: QEMU announces ports after the driver is up.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Pause before a new session once the host side went away (a restored VM's new relay).
const RESTART_PAUSE: Duration = Duration::from_millis(20);

/// Whether the kernel command line asks for the serial channel.
pub fn serial_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "husk.channel=serial"))
}

/// Serves `on_stream` for every stream the host opens to [`AGENT_PORT`] or [`SAVE_PORT`] over
/// the serial port (with the port), forever: a session that ends (the host side closed, a
/// malformed frame) is followed by a new one on the same port.
pub async fn serve_serial<F>(mut on_stream: F) -> io::Result<()>
where
    F: FnMut(u32, MuxStream),
{
    let port = Arc::new(crate::sys::async_fd(open_port().await?)?);
    loop {
        let (session, mut accepted): (Session, mpsc::Receiver<(u32, MuxStream)>) = Session::guest(
            Port(port.clone()),
            Port(port.clone()),
            vec![AGENT_PORT, SAVE_PORT],
        );
        loop {
            tokio::select! {
                stream = accepted.recv() => match stream {
                    Some((to, stream)) => on_stream(to, stream),
                    None => break,
                },
                why = session.ended() => {
                    eprintln!("husk-agent: host channel: {why}");
                    break;
                }
            }
        }
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}

/// Opens `/dev/<vportNpM>` of the port named [`PORT_NAME`], waiting for QEMU to announce it.
async fn open_port() -> io::Result<OwnedFd> {
    let deadline = tokio::time::Instant::now() + PORT_WAIT;
    loop {
        if let Some(dev) = find_port()? {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(std::path::Path::new("/dev").join(dev))?;
            return Ok(file.into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "no virtio-serial port named {PORT_NAME}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn find_port() -> io::Result<Option<String>> {
    let dir = match std::fs::read_dir("/sys/class/virtio-ports") {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in dir.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim_end() == PORT_NAME {
            return Ok(entry.file_name().into_string().ok());
        }
    }
    Ok(None)
}

/// The port, non-blocking, as a tokio byte stream (reader and writer share the descriptor).
struct Port(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
