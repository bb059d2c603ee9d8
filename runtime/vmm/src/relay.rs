//! `husk-vmm serial-relay`: the host side of the QEMU door's guest channel.
//!
//! QEMU cannot save a VM with its vhost-user vsock device, so the QEMU door gives the guest a
//! virtio-serial port instead, and the agent multiplexes its streams over it
//! (`husk_protocol::mux`). This relay holds QEMU's end of the port (a chardev socket, accepted
//! once on `--socket`) and serves the same hybrid vsock socket the vsock device serves on
//! `--uds`: a host client writes `CONNECT <port>\n` and reads `OK <port>\n`, then the
//! connection is a stream to that guest port. One more line, `QUIESCE\n`, answered
//! `OK QUIESCED\n`, makes the guest close every stream and go quiet before the VM is saved; a
//! restored VM's new relay says hello and the guest serves again.
//!
//! The relay is async (tokio, one thread), unlike the VMM: it runs the same multiplexer as the
//! agent. Everything it reads from the port is the guest's: the multiplexer bounds it, and a
//! malformed frame ends the session, which ends the relay.

use std::path::Path;
use std::time::Duration;

use husk_protocol::mux::{MuxStream, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line a host client may send.
const MAX_LINE: usize = 32;
/// How long a host client may take to send its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to answer an open or a quiesce: longer than the host's own
/// deadlines (the sandbox's), so that those decide and name what timed out.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds both sockets, calls `confine` once they listen, then relays until QEMU closes the
/// port or the guest breaks the channel. The socket files are removed on return.
///
/// # Errors
/// Binding, accepting QEMU's connection or the runtime failing.
pub fn run(
    serial: &Path,
    uds: &Path,
    confine: impl FnOnce() -> std::io::Result<()>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let port = UnixListener::bind(serial)?;
        let clients = UnixListener::bind(uds)?;
        confine()?;
        let (channel, _) = port.accept().await?;
        drop(port);
        let (rd, wr) = channel.into_split();
        let session = Session::host(rd, wr);
        loop {
            tokio::select! {
                client = clients.accept() => {
                    if let Ok((client, _)) = client {
                        tokio::spawn(serve_client(client, session.clone()));
                    }
                }
                why = session.ended() => {
                    tracing::info!("guest channel ended: {why}");
                    return Ok(());
                }
            }
        }
    });
    for path in [serial, uds] {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn serve_client(mut client: UnixStream, session: Session) {
    let Ok(Ok(line)) = tokio::time::timeout(LINE_TIMEOUT, read_line(&mut client)).await else {
        return;
    };
    match parse(&line) {
        Some(Request::Connect(port)) => {
            let Ok(Ok(mut stream)) = tokio::time::timeout(ANSWER_TIMEOUT, session.open(port)).await
            else {
                return;
            };
            if client
                .write_all(format!("OK {port}\n").as_bytes())
                .await
                .is_ok()
            {
                relay(&mut client, &mut stream).await;
            }
        }
        Some(Request::Quiesce) => {
            if let Ok(Ok(())) = tokio::time::timeout(ANSWER_TIMEOUT, session.quiesce()).await {
                let _ = client.write_all(b"OK QUIESCED\n").await;
            }
        }
        None => {}
    }
}

async fn relay(client: &mut UnixStream, stream: &mut MuxStream) {
    let _ = tokio::io::copy_bidirectional(client, stream).await;
}

/// Reads one line of at most [`MAX_LINE`] bytes, without its `\n`.
async fn read_line(client: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let byte = client.read_u8().await?;
        if byte == b'\n' {
            return Ok(line);
        }
        if line.len() == MAX_LINE {
            return Err(std::io::Error::other("request line too long"));
        }
        line.push(byte);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Request {
    Connect(u32),
    Quiesce,
}

fn parse(line: &[u8]) -> Option<Request> {
    let line = std::str::from_utf8(line).ok()?;
    if line == "QUIESCE" {
        return Some(Request::Quiesce);
    }
    let port = line.strip_prefix("CONNECT ")?;
    port.parse().ok().map(Request::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_lines() {
        assert_eq!(parse(b"CONNECT 1024"), Some(Request::Connect(1024)));
        assert_eq!(parse(b"QUIESCE"), Some(Request::Quiesce));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"CONNECT 1 2",
            b"connect 1",
            b"\xff",
        ] {
            assert_eq!(parse(bad), None);
        }
    }

    #[tokio::test]
    async fn test_relay_connects_a_client_to_a_guest_port_and_quiesces() {
        let dir = tempfile::tempdir().unwrap();
        let (serial, uds) = (
            dir.path().join("serial.sock"),
            dir.path().join("vsock.sock"),
        );
        let (s2, u2) = (serial.clone(), uds.clone());
        let relay = std::thread::spawn(move || run(&s2, &u2, || Ok(())));
        while !uds.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let port = UnixStream::connect(&serial).await.unwrap();
        let (rd, wr) = port.into_split();
        let (_guest, mut accepted) = Session::guest(rd, wr, vec![1024]);
        let mut c = UnixStream::connect(&uds).await.unwrap();
        c.write_all(b"CONNECT 1024\n").await.unwrap();
        let (_, mut g) = accepted.recv().await.unwrap();
        let mut ok = [0u8; 8];
        c.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"OK 1024\n");
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        g.write_all(b"pong").await.unwrap();
        drop(g);
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let mut refused = UnixStream::connect(&uds).await.unwrap();
        refused.write_all(b"CONNECT 7\n").await.unwrap();
        let mut nothing = Vec::new();
        refused.read_to_end(&mut nothing).await.unwrap();
        assert!(nothing.is_empty());
        let mut q = UnixStream::connect(&uds).await.unwrap();
        q.write_all(b"QUIESCE\n").await.unwrap();
        let mut answer = Vec::new();
        q.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"OK QUIESCED\n");
        drop(_guest);
        drop(accepted);
        let _ = relay;
    }
}
