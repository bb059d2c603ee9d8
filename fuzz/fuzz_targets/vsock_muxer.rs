//! The hybrid-vsock muxer: host clients writing fuzzed `CONNECT <port>\n` lines (and bytes
//! after them), host services for guest-initiated connections, and guest packets with fuzzed
//! ops, ports, flags and credit, so that connections go through every state (handshake,
//! established, half-closed, reset, killed) in any order.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use husk_devices::fuzzing::{parse_connect_line, VsockFuzz};
use husk_fuzz::{Guest, Input, DESC_F_WRITE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const HDR_LEN: u32 = 44;
/// First host port the muxer gives host-initiated connections (`LOCAL_PORT_MIN`).
const LOCAL_PORT_MIN: u32 = 1 << 30;
const MAX_CLIENTS: usize = 4;

/// Host-side sockets of one run.
#[derive(Default)]
struct Host {
    clients: Vec<UnixStream>,
    listeners: Vec<UnixListener>,
}

fuzz_target!(|data: &[u8]| {
    husk_fuzz::ignore_sigpipe();
    let dir = tempfile::tempdir().expect("temp dir");
    let uds = dir.path().join("v.sock");
    let Ok(mut dev) = VsockFuzz::new(GUEST_CID, &uds) else {
        return;
    };
    let mut guest = Guest::new(2);
    let mut host = Host::default();
    let mut input = Input::new(data);
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        step(&mut input, &mut guest, &mut dev, &mut host, &uds);
    }
    pump(&mut guest, &mut dev);
});

fn step(
    input: &mut Input<'_>,
    guest: &mut Guest,
    dev: &mut VsockFuzz,
    host: &mut Host,
    uds: &Path,
) {
    match input.u8() % 8 {
        0 => connect_line(input, host, uds),
        1 => {
            let (k, bytes) = (input.u8(), input.blob());
            if let Some(c) = client(host, k) {
                let _ = c.write(bytes);
            }
        }
        2 => {
            let (k, how) = (input.u8(), input.u8());
            if let Some(c) = client(host, k) {
                let how = [Shutdown::Write, Shutdown::Read, Shutdown::Both][usize::from(how % 3)];
                let _ = c.shutdown(how);
            }
        }
        3 => drain_or_close(input, host),
        4 => listen(input, host, uds),
        5 => guest_packet(input, guest),
        6 => {
            for _ in 0..input.u8() % 4 + 1 {
                guest.push_buffer(RXQ, HDR_LEN + 4096, DESC_F_WRITE);
            }
        }
        _ => pump(guest, dev),
    }
}

/// A host client connects and writes a line (`CONNECT <port>\n` shaped or not).
fn connect_line(input: &mut Input<'_>, host: &mut Host, uds: &Path) {
    let line = input.blob();
    // The parser on its own: whatever it accepts names the port it prints back to.
    if let Some(port) = line.strip_suffix(b"\n").and_then(parse_connect_line) {
        assert_eq!(
            parse_connect_line(format!("CONNECT {port}").as_bytes()),
            Some(port)
        );
    }
    if host.clients.len() >= MAX_CLIENTS {
        host.clients.remove(0);
    }
    if let Ok(mut stream) = UnixStream::connect(uds) {
        let _ = stream.set_nonblocking(true);
        let _ = stream.write(line);
        host.clients.push(stream);
    }
}

fn client(host: &mut Host, k: u8) -> Option<&mut UnixStream> {
    let n = host.clients.len();
    host.clients.get_mut(usize::from(k).checked_rem(n)?)
}

/// Reads what a client got (an `OK <port>` line, data), or closes it.
fn drain_or_close(input: &mut Input<'_>, host: &mut Host) {
    let (k, close) = (input.u8(), input.u8() & 1 == 1);
    let n = host.clients.len();
    let Some(i) = usize::from(k).checked_rem(n) else {
        return;
    };
    if close {
        host.clients.remove(i);
    } else if let Some(c) = host.clients.get_mut(i) {
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf);
    }
}

/// A host service listens for guest connections to host port `1000 + n` and accepts those
/// pending.
fn listen(input: &mut Input<'_>, host: &mut Host, uds: &Path) {
    let port = 1000 + u32::from(input.u8() % 4);
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    if let Ok(listener) = UnixListener::bind(&path) {
        let _ = listener.set_nonblocking(true);
        host.listeners.push(listener);
    }
    for listener in &host.listeners {
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(true);
            if host.clients.len() < MAX_CLIENTS * 2 {
                host.clients.push(stream);
            }
        }
    }
}

/// A host port the guest may address: a service port or one the muxer allocated.
fn host_port(b: u8) -> u32 {
    match b & 0x80 {
        0 => 1000 + u32::from(b % 4),
        _ => LOCAL_PORT_MIN + u32::from(b % 4),
    }
}

/// A guest packet on a small set of ports with a fuzzed op, flags, credit and payload.
fn guest_packet(input: &mut Input<'_>, guest: &mut Guest) {
    let Some(addr) = guest.ring(TXQ).map(|r| r.slot(r.next_desc())) else {
        return;
    };
    let (ports, op, flags) = (input.u8(), input.u8(), input.u8());
    let (buf_alloc, fwd_cnt) = (input.u32(), input.u32());
    let payload = input.blob();
    let mut hdr = Vec::with_capacity(44);
    hdr.extend_from_slice(&GUEST_CID.to_le_bytes());
    hdr.extend_from_slice(&2u64.to_le_bytes());
    hdr.extend_from_slice(&(2000 + u32::from(ports & 3)).to_le_bytes());
    hdr.extend_from_slice(&host_port(ports).to_le_bytes());
    hdr.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_le_bytes());
    hdr.extend_from_slice(&1u16.to_le_bytes()); // stream
    hdr.extend_from_slice(&u16::from(op % 8).to_le_bytes());
    hdr.extend_from_slice(&u32::from(flags % 4).to_le_bytes());
    hdr.extend_from_slice(&buf_alloc.to_le_bytes());
    hdr.extend_from_slice(&fwd_cnt.to_le_bytes());
    let _ = guest.mem.write_slice(&hdr, GuestAddress(addr));
    let _ = guest
        .mem
        .write_slice(payload, GuestAddress(addr + u64::from(HDR_LEN)));
    let len = HDR_LEN + u32::try_from(payload.len()).unwrap_or(0);
    guest.push_chain(TXQ, &[(addr, len, 0)]);
}

/// Host events, then the queues; every RX buffer the device used is posted again.
fn pump(guest: &mut Guest, dev: &mut VsockFuzz) {
    dev.notify_backend();
    let Guest { mem, queues, .. } = guest;
    if let [rxq, txq] = queues.as_mut_slice() {
        dev.process_queues(mem, rxq, txq);
    }
    for _ in 0..guest.take_used(RXQ) {
        guest.push_buffer(RXQ, HDR_LEN + 4096, DESC_F_WRITE);
    }
    guest.take_used(TXQ);
}
