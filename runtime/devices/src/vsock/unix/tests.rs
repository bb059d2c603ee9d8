//! Whole-device tests of the hybrid vsock backend: a real [`Vsock`] over a real
//! [`VsockUnixBackend`], driven through raw virtqueues by [`TestContext`] playing the guest
//! driver, with real Unix sockets as the host side.
//!
//! One scenario per test: connection setup from either side, data both ways, credit flow
//! control (virtio 1.2 §5.10.6.3) in both directions, shutdown and reset, and a hostile guest.
//! Every host-side event is in place before the device is pumped, so the outcome does not
//! depend on timing; the pump helpers only poll.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use super::defs::{LOCAL_PORT_END, LOCAL_PORT_MIN};
use super::VsockUnixBackend;
use crate::vsock::csm::defs::{CONN_CREDIT_UPDATE_THRESHOLD, CONN_TX_BUF_SIZE};
use crate::vsock::defs::uapi::*;
use crate::vsock::defs::MAX_PKT_BUF_SIZE;
use crate::vsock::device::Vsock;
use crate::vsock::metrics::METRICS;
use crate::vsock::test_utils::*;

/// RX buffers the test guest keeps posted.
const RX_BUFS: usize = 32;
/// Guest-side port of the test connections.
const GUEST_PORT: u32 = 1024;
/// Host-side port of guest-initiated test connections.
const HOST_PORT: u32 = 5000;
/// A small guest receive buffer, for credit tests.
const SMALL_BUF_ALLOC: u32 = 4096;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET` (include/uapi/linux/virtio_vsock.h); never negotiated here.
const VSOCK_TYPE_SEQPACKET: u16 = 2;
/// The datagram type of virtio-vsock proposals; unknown to this device.
const VSOCK_TYPE_DGRAM: u16 = 3;

type Device = Vsock<VsockUnixBackend>;

fn setup() -> (TestContext, Device) {
    let mut ctx = TestContext::new();
    let dev = ctx.device();
    ctx.push_rx_buffers(RX_BUFS);
    (ctx, dev)
}

fn has_op(pkts: &[RxPkt], op: u16) -> bool {
    pkts.iter().any(|p| p.hdr.op == op)
}

fn ops(pkts: &[RxPkt]) -> Vec<u16> {
    pkts.iter().map(|p| p.hdr.op).collect()
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap()
}

/// The guest sends as much as its credit allows to a host service that does not read,
/// asking for a credit update after each packet. Returns the bytes sent and the `fwd_cnt` the
/// device last reported, once the credit is zero.
fn fill_until_no_credit(ctx: &mut TestContext, dev: &mut Device, conn: &Conn) -> (Vec<u8>, u32) {
    let mut sent: Vec<u8> = Vec::new();
    let mut fwd_cnt = 0u32;
    loop {
        let in_flight = len_u32(sent.len()).checked_sub(fwd_cnt).unwrap();
        let credit = CONN_TX_BUF_SIZE.checked_sub(in_flight).unwrap();
        if credit == 0 {
            return (sent, fwd_cnt);
        }
        assert!(sent.len() < 64 << 20, "the host stream never pushed back");
        let end = sent.len() + usize::try_from(credit.min(TX_BUF_DATA)).unwrap();
        let chunk = pattern(end).split_off(sent.len());
        ctx.push_tx(conn.hdr(VSOCK_OP_RW), &chunk);
        sent.extend(chunk);
        ctx.push_tx(conn.hdr(VSOCK_OP_CREDIT_REQUEST), &[]);
        let pkts = ctx.pump_until(dev, |p| has_op(p, VSOCK_OP_CREDIT_UPDATE));
        assert_eq!(ops(&pkts), [VSOCK_OP_CREDIT_UPDATE], "{pkts:?}");
        fwd_cnt = pkts[0].hdr.fwd_cnt;
    }
}

// Host-initiated connections.

#[test]
fn test_host_connect_connect_line_guest_gets_request_with_ports() {
    let (mut ctx, mut dev) = setup();

    let (_stream, req) = ctx.host_connect(&mut dev, GUEST_PORT);

    assert_eq!(req.hdr.op, VSOCK_OP_REQUEST);
    assert_eq!(
        (req.hdr.src_cid, req.hdr.dst_cid),
        (VSOCK_HOST_CID, GUEST_CID)
    );
    assert_eq!(req.hdr.dst_port, GUEST_PORT);
    assert!((LOCAL_PORT_MIN..LOCAL_PORT_END).contains(&req.hdr.src_port));
    assert_eq!(req.hdr.type_, VSOCK_TYPE_STREAM);
    assert_eq!((req.hdr.len, req.used_len), (0, HDR_LEN));
    assert_eq!(req.hdr.buf_alloc, CONN_TX_BUF_SIZE);
}

#[test]
fn test_host_connect_guest_response_host_reads_ok_port() {
    let (mut ctx, mut dev) = setup();
    let (mut stream, req) = ctx.host_connect(&mut dev, GUEST_PORT);
    let host_port = req.hdr.src_port;

    ctx.push_tx(Hdr::guest(VSOCK_OP_RESPONSE, GUEST_PORT, host_port), &[]);
    ctx.process(&mut dev);

    let ok = format!("OK {host_port}\n");
    assert_eq!(read_n(&mut stream, ok.len()), ok.as_bytes());
    assert!(is_open_and_empty(&mut stream));
}

#[test]
fn test_host_connect_two_clients_distinct_host_ports() {
    let (mut ctx, mut dev) = setup();

    let (_a, req_a) = ctx.host_connect(&mut dev, GUEST_PORT);
    let (_b, req_b) = ctx.host_connect(&mut dev, GUEST_PORT);

    assert_eq!(
        (req_a.hdr.op, req_b.hdr.op),
        (VSOCK_OP_REQUEST, VSOCK_OP_REQUEST)
    );
    assert_ne!(req_a.hdr.src_port, req_b.hdr.src_port);
}

#[test]
fn test_host_connect_guest_rst_host_sees_eof() {
    let (mut ctx, mut dev) = setup();
    let (mut stream, req) = ctx.host_connect(&mut dev, GUEST_PORT);

    ctx.push_tx(Hdr::guest(VSOCK_OP_RST, GUEST_PORT, req.hdr.src_port), &[]);
    ctx.process(&mut dev);

    assert!(is_eof(&mut stream));
}

#[test]
fn test_host_connect_malformed_line_closed_without_request() {
    let (mut ctx, mut dev) = setup();
    let fails = METRICS.host_handshake_fails.count();
    let mut stream = UnixStream::connect(ctx.uds_path()).unwrap();
    stream.write_all(b"CONNECT nope\n").unwrap();

    // One round accepts the client, the next reads its line.
    let pkts = ctx.pump_rounds(&mut dev, 3);

    assert!(pkts.is_empty(), "{pkts:?}");
    assert!(is_eof(&mut stream));
    assert!(METRICS.host_handshake_fails.count() > fails);
}

#[test]
fn test_host_connect_client_gone_before_response_guest_gets_rst() {
    let (mut ctx, mut dev) = setup();
    let (stream, req) = ctx.host_connect(&mut dev, GUEST_PORT);
    drop(stream);

    ctx.push_tx(
        Hdr::guest(VSOCK_OP_RESPONSE, GUEST_PORT, req.hdr.src_port),
        &[],
    );
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert_eq!(
        (pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
        (req.hdr.src_port, GUEST_PORT)
    );
}

// Guest-initiated connections.

#[test]
fn test_guest_connect_listener_present_response_and_accept() {
    let (mut ctx, mut dev) = setup();
    let listener = UnixListener::bind(ctx.port_path(HOST_PORT)).unwrap();

    let reply = ctx.guest_connect(&mut dev, GUEST_PORT, HOST_PORT);

    assert_eq!(reply.hdr.op, VSOCK_OP_RESPONSE);
    assert_eq!(
        (reply.hdr.src_port, reply.hdr.dst_port),
        (HOST_PORT, GUEST_PORT)
    );
    assert_eq!(
        (reply.hdr.src_cid, reply.hdr.dst_cid),
        (VSOCK_HOST_CID, GUEST_CID)
    );
    assert_eq!(reply.hdr.buf_alloc, CONN_TX_BUF_SIZE);
    assert!(accept_now(&listener).is_some());
}

#[test]
fn test_guest_connect_no_listener_rst() {
    let (mut ctx, mut dev) = setup();
    let refused = METRICS.conns_refused.count();

    let reply = ctx.guest_connect(&mut dev, GUEST_PORT, HOST_PORT);

    assert_eq!(reply.hdr.op, VSOCK_OP_RST);
    assert_eq!(
        (reply.hdr.src_port, reply.hdr.dst_port),
        (HOST_PORT, GUEST_PORT)
    );
    assert_eq!(reply.hdr.dst_cid, GUEST_CID);
    assert!(METRICS.conns_refused.count() > refused);
}

// Data.

#[test]
fn test_rw_guest_payloads_host_reads_intact_in_order() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let data = pattern(usize::try_from(TX_BUF_DATA).unwrap() + 100);
    let (first, second) = data.split_at(usize::try_from(TX_BUF_DATA).unwrap());

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), first);
    ctx.push_tx(conn.hdr(VSOCK_OP_RW), second);
    ctx.process(&mut dev);

    assert!(read_n(&mut conn.stream, data.len()) == data);
}

#[test]
fn test_rw_guest_payload_on_host_initiated_conn_host_reads_it() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_host(&mut dev, GUEST_PORT);

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"from the guest");
    ctx.process(&mut dev);

    assert_eq!(read_n(&mut conn.stream, 14), b"from the guest");
}

#[test]
fn test_rw_host_payload_guest_gets_rw_packets_intact() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_host(&mut dev, GUEST_PORT);
    conn.stream.write_all(b"hello guest").unwrap();

    let (payload, pkts) = ctx.pump_until_payload(&mut dev, 11);

    assert_eq!(payload, b"hello guest");
    assert!(pkts.iter().all(|p| conn.owns(p) && p.hdr.op == VSOCK_OP_RW));
    assert!(pkts.iter().all(|p| p.used_len == HDR_LEN + p.hdr.len));
}

#[test]
fn test_rw_host_64k_payload_split_over_rx_buffers_in_order() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let data = pattern(64 * 1024);
    let mut writer = conn.stream.try_clone().unwrap();
    let to_send = data.clone();
    // A writer thread, so the test does not rely on the socket buffer holding 64 KiB.
    let handle = thread::spawn(move || writer.write_all(&to_send).unwrap());

    let (payload, pkts) = ctx.pump_until_payload(&mut dev, data.len());
    handle.join().unwrap();

    assert!(payload == data, "payload differs from what the host wrote");
    assert!(pkts.len() >= data.len() / usize::try_from(RX_BUF_DATA).unwrap());
    assert!(pkts
        .iter()
        .all(|p| conn.owns(p) && p.hdr.op == VSOCK_OP_RW && p.hdr.len <= RX_BUF_DATA));
}

#[test]
fn test_rw_host_data_written_before_guest_accepts_delivered_after_ok() {
    let (mut ctx, mut dev) = setup();
    let mut stream = UnixStream::connect(ctx.uds_path()).unwrap();
    stream.write_all(b"CONNECT 1024\nearly bytes").unwrap();
    let req = ctx.pump_until_rx(&mut dev).remove(0);
    let host_port = req.hdr.src_port;

    ctx.push_tx(Hdr::guest(VSOCK_OP_RESPONSE, GUEST_PORT, host_port), &[]);
    let (payload, _) = ctx.pump_until_payload(&mut dev, 11);

    assert_eq!(payload, b"early bytes");
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_n(&mut stream, ok.len()), ok.as_bytes());
}

#[test]
fn test_rw_two_connections_payloads_not_mixed() {
    let (mut ctx, mut dev) = setup();
    let mut a = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let mut b = ctx.connect_from_host(&mut dev, GUEST_PORT + 1);
    let data_a = pattern(10_000);
    let data_b: Vec<u8> = pattern(10_001).into_iter().rev().collect();
    a.stream.write_all(&data_a).unwrap();
    b.stream.write_all(&data_b).unwrap();

    let pkts = ctx.pump_until(&mut dev, |p| {
        rw_payload(p).len() >= data_a.len() + data_b.len()
    });

    let of = |conn: &Conn| {
        let mine: Vec<RxPkt> = pkts.iter().filter(|p| conn.owns(p)).cloned().collect();
        rw_payload(&mine)
    };
    assert!(of(&a) == data_a && of(&b) == data_b, "payloads mixed up");
    assert!(pkts.iter().all(|p| a.owns(p) || b.owns(p)));
}

// Credit, host to guest.

#[test]
fn test_credit_small_guest_buf_alloc_device_stops_at_credit_and_requests() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, SMALL_BUF_ALLOC);
    let data = pattern(16 * 1024);
    conn.stream.write_all(&data).unwrap();

    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_CREDIT_REQUEST));
    let later = ctx.pump_rounds(&mut dev, 5);

    assert!(rw_payload(&pkts) == data[..4096]);
    assert_eq!(pkts.last().map(|p| p.hdr.op), Some(VSOCK_OP_CREDIT_REQUEST));
    assert!(pkts.iter().all(|p| conn.owns(p)));
    assert!(later.is_empty(), "{later:?}");
}

#[test]
fn test_credit_guest_credit_update_resumes_delivery_within_window() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, SMALL_BUF_ALLOC);
    let data = pattern(16 * 1024);
    conn.stream.write_all(&data).unwrap();
    let mut got = rw_payload(&ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_CREDIT_REQUEST)));
    let mut update = conn.hdr(VSOCK_OP_CREDIT_UPDATE);
    update.buf_alloc = SMALL_BUF_ALLOC;

    // The guest consumed 1000 bytes: exactly 1000 more fit its buffer.
    update.fwd_cnt = 1000;
    ctx.push_tx(update, &[]);
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_CREDIT_REQUEST));
    assert_eq!(rw_payload(&pkts).len(), 1000);
    got.extend(rw_payload(&pkts));
    // From then on the guest consumes everything it got: each window is filled, no more.
    while got.len() < data.len() {
        update.fwd_cnt = len_u32(got.len());
        ctx.push_tx(update, &[]);
        let window = (data.len() - got.len()).min(usize::try_from(SMALL_BUF_ALLOC).unwrap());
        let (payload, _) = ctx.pump_until_payload(&mut dev, window);
        assert_eq!(payload.len(), window);
        got.extend(payload);
    }

    assert!(got == data, "payload differs from what the host wrote");
    assert!(ctx.pump_rounds(&mut dev, 3).is_empty());
}

#[test]
fn test_credit_guest_fwd_cnt_ahead_of_sent_stalls_only_until_honest_update() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, SMALL_BUF_ALLOC);
    let mut update = conn.hdr(VSOCK_OP_CREDIT_UPDATE);
    update.buf_alloc = SMALL_BUF_ALLOC;
    update.fwd_cnt = 100; // "consumed" 100 bytes it never got: in flight wraps to ~4 GiB
    ctx.push_tx(update, &[]);
    ctx.process(&mut dev);
    conn.stream.write_all(b"data").unwrap();

    let stalled = ctx.pump_rounds(&mut dev, 5);
    update.fwd_cnt = 0;
    ctx.push_tx(update, &[]);
    let (payload, _) = ctx.pump_until_payload(&mut dev, 4);

    assert!(rw_payload(&stalled).is_empty(), "{stalled:?}");
    assert_eq!(payload, b"data");
}

#[test]
fn test_credit_guest_credit_request_answered_with_credit_update() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"0123456789");
    ctx.push_tx(conn.hdr(VSOCK_OP_CREDIT_REQUEST), &[]);

    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_CREDIT_UPDATE]);
    assert!(conn.owns(&pkts[0]));
    assert_eq!(
        (pkts[0].hdr.buf_alloc, pkts[0].hdr.fwd_cnt),
        (CONN_TX_BUF_SIZE, 10)
    );
    assert_eq!(read_n(&mut conn.stream, 10), b"0123456789");
}

// Credit, guest to host.

#[test]
fn test_credit_forwarded_past_threshold_unsolicited_credit_update() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let data = pattern(usize::try_from(CONN_CREDIT_UPDATE_THRESHOLD).unwrap());
    let mut reader = conn.stream.try_clone().unwrap();
    let len = data.len();
    // A reader thread, so the test does not rely on the socket buffer holding it all.
    let handle = thread::spawn(move || read_n(&mut reader, len));

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), &data);
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_CREDIT_UPDATE]);
    assert!(conn.owns(&pkts[0]));
    assert_eq!(pkts[0].hdr.fwd_cnt, CONN_CREDIT_UPDATE_THRESHOLD);
    assert!(handle.join().unwrap() == data);
}

#[test]
fn test_credit_host_not_reading_fwd_cnt_stops_guest_without_reset() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);

    let (sent, fwd_cnt) = fill_until_no_credit(&mut ctx, &mut dev, &conn);

    // Only what the host stream took counts as forwarded; the rest waits in the device.
    assert!(fwd_cnt < len_u32(sent.len()));
    assert_eq!(len_u32(sent.len()) - fwd_cnt, CONN_TX_BUF_SIZE);
    assert!(ctx.pump_rounds(&mut dev, 3).is_empty());
}

#[test]
fn test_credit_host_drains_after_backpressure_data_intact_credit_restored() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let (sent, _) = fill_until_no_credit(&mut ctx, &mut dev, &conn);
    let mut reader = conn.stream.try_clone().unwrap();
    let len = sent.len();

    let handle = thread::spawn(move || read_n(&mut reader, len));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handle.is_finished() {
        // The device flushes its buffer as the host stream becomes writable.
        ctx.pump_rounds(&mut dev, 1);
        assert!(Instant::now() < deadline, "the host never got all the data");
        thread::sleep(Duration::from_millis(1));
    }
    let received = handle.join().unwrap();
    ctx.push_tx(conn.hdr(VSOCK_OP_CREDIT_REQUEST), &[]);
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_CREDIT_UPDATE));

    assert!(
        received == sent,
        "the host got other bytes than the guest sent"
    );
    assert_eq!(pkts.last().map(|p| p.hdr.fwd_cnt), Some(len_u32(len)));
}

#[test]
fn test_credit_guest_exceeding_credit_reset() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let (_, fwd_cnt) = fill_until_no_credit(&mut ctx, &mut dev, &conn);
    let violations = METRICS.credit_violations.count();

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"x");
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(conn.owns(&pkts[0]));
    assert!(METRICS.credit_violations.count() > violations);
    // The host gets what its stream had taken, then EOF: the device's buffer is dropped.
    let mut rest = Vec::new();
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    conn.stream.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), usize::try_from(fwd_cnt).unwrap());
}

// Reset and shutdown.

#[test]
fn test_rst_orphan_packets_answered_with_rst() {
    let (mut ctx, mut dev) = setup();
    let orphan_ops = [
        VSOCK_OP_RW,
        VSOCK_OP_RESPONSE,
        VSOCK_OP_SHUTDOWN,
        VSOCK_OP_CREDIT_UPDATE,
        VSOCK_OP_CREDIT_REQUEST,
        0,
        0xffff,
    ];
    for (guest_port, op) in (7000..).zip(orphan_ops) {
        let data: &[u8] = if op == VSOCK_OP_RW { b"x" } else { &[] };
        ctx.push_tx(Hdr::guest(op, guest_port, HOST_PORT), data);
    }

    let pkts = ctx.pump_until(&mut dev, |p| p.len() >= orphan_ops.len());

    assert_eq!(pkts.len(), orphan_ops.len());
    for (guest_port, pkt) in (7000..).zip(&pkts) {
        assert_eq!(pkt.hdr.op, VSOCK_OP_RST);
        assert_eq!(
            (pkt.hdr.src_port, pkt.hdr.dst_port),
            (HOST_PORT, guest_port)
        );
        assert_eq!(pkt.hdr.dst_cid, GUEST_CID);
    }
}

#[test]
fn test_rst_orphan_rst_not_answered() {
    let (mut ctx, mut dev) = setup();

    ctx.push_tx(Hdr::guest(VSOCK_OP_RST, GUEST_PORT, HOST_PORT), &[]);
    let pkts = ctx.pump_rounds(&mut dev, 3);

    assert!(pkts.is_empty(), "{pkts:?}");
}

#[test]
fn test_rst_guest_rst_closes_host_stream() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);

    ctx.push_tx(conn.hdr(VSOCK_OP_RST), &[]);
    ctx.process(&mut dev);

    assert!(is_eof(&mut conn.stream));
}

#[test]
fn test_rst_after_guest_rst_connection_forgotten() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    ctx.push_tx(conn.hdr(VSOCK_OP_RST), &[]);
    ctx.process(&mut dev);

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"late");
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(conn.owns(&pkts[0]));
}

#[test]
fn test_shutdown_guest_send_host_sees_eof() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let mut shutdown = conn.hdr(VSOCK_OP_SHUTDOWN);
    shutdown.flags = VSOCK_FLAGS_SHUTDOWN_SEND;

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"last");
    ctx.push_tx(shutdown, &[]);
    ctx.process(&mut dev);

    assert_eq!(read_n(&mut conn.stream, 4), b"last");
    assert!(is_eof(&mut conn.stream));
}

#[test]
fn test_shutdown_guest_send_host_still_writes_to_guest() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let mut shutdown = conn.hdr(VSOCK_OP_SHUTDOWN);
    shutdown.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    ctx.push_tx(shutdown, &[]);
    ctx.process(&mut dev);

    conn.stream.write_all(b"reply").unwrap();
    let (payload, pkts) = ctx.pump_until_payload(&mut dev, 5);

    assert_eq!(payload, b"reply");
    assert_eq!(ops(&pkts), [VSOCK_OP_RW]);
}

#[test]
fn test_shutdown_guest_all_device_answers_rst_host_sees_eof() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let mut shutdown = conn.hdr(VSOCK_OP_SHUTDOWN);
    shutdown.flags = VSOCK_FLAGS_SHUTDOWN_ALL;

    ctx.push_tx(shutdown, &[]);
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(conn.owns(&pkts[0]));
    assert!(is_eof(&mut conn.stream));
}

#[test]
fn test_shutdown_guest_all_with_buffered_data_host_gets_all_then_eof() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let (sent, _) = fill_until_no_credit(&mut ctx, &mut dev, &conn);
    let mut shutdown = conn.hdr(VSOCK_OP_SHUTDOWN);
    shutdown.flags = VSOCK_FLAGS_SHUTDOWN_ALL;
    ctx.push_tx(shutdown, &[]);
    let before_drain = ctx.pump_rounds(&mut dev, 3);
    let mut reader = conn.stream.try_clone().unwrap();

    let handle = thread::spawn(move || {
        let mut all = Vec::new();
        reader
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        reader.read_to_end(&mut all).unwrap();
        all
    });
    // The RST that completes the guest's close comes once the buffer reached the host.
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_RST));
    let received = handle.join().unwrap();

    assert!(before_drain.is_empty(), "{before_drain:?}");
    assert!(pkts.iter().all(|p| conn.owns(p)));
    assert!(received == sent, "the host lost buffered bytes");
}

#[test]
fn test_shutdown_host_close_guest_gets_pending_data_then_shutdown_all() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    conn.stream.write_all(b"bye").unwrap();
    let Conn {
        stream,
        host_port,
        guest_port,
    } = conn;

    drop(stream);
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_SHUTDOWN));

    assert_eq!(ops(&pkts), [VSOCK_OP_RW, VSOCK_OP_SHUTDOWN]);
    assert_eq!(rw_payload(&pkts), b"bye");
    assert_eq!(pkts[1].hdr.flags, VSOCK_FLAGS_SHUTDOWN_ALL);
    assert!(pkts
        .iter()
        .all(|p| (p.hdr.src_port, p.hdr.dst_port) == (host_port, guest_port)));
}

#[test]
fn test_shutdown_host_half_close_guest_gets_shutdown_send_and_can_still_write() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);

    conn.stream.shutdown(Shutdown::Write).unwrap();
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_SHUTDOWN));
    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"still");
    ctx.process(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_SHUTDOWN]);
    assert_eq!(pkts[0].hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
    assert_eq!(read_n(&mut conn.stream, 5), b"still");
}

#[test]
fn test_shutdown_closing_guest_rst_removes_connection() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    conn.stream.shutdown(Shutdown::Both).unwrap();
    let pkts = ctx.pump_until(&mut dev, |p| has_op(p, VSOCK_OP_SHUTDOWN));
    assert_eq!(pkts[0].hdr.flags, VSOCK_FLAGS_SHUTDOWN_ALL);

    ctx.push_tx(conn.hdr(VSOCK_OP_RST), &[]);
    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"late");
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST], "the rw found no connection");
}

// Hostile guest.

#[test]
fn test_hostile_tx_len_beyond_descriptors_dropped_connection_keeps_working() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    ctx.take_used_tx();
    let bad = METRICS.tx_bad_desc.count();
    let lying = |len| Hdr {
        len,
        ..conn.hdr(VSOCK_OP_RW)
    };
    // Each chain at its own address: headers are written when queued.
    let at = |i: u64| SCRATCH_BASE + i * 0x4_0000;
    // Data descriptor shorter than `len`.
    ctx.push_tx_hdr_raw(lying(1000), &[(at(0), HDR_LEN, 0), (at(0) + 0x100, 10, 0)]);
    // One descriptor, payload after the header shorter than `len`.
    ctx.push_tx_hdr_raw(lying(100), &[(at(1), HDR_LEN + 10, 0)]);
    // `len` but no data descriptor at all.
    ctx.push_tx_hdr_raw(lying(100), &[(at(2), HDR_LEN, 0)]);
    // `len` above the largest packet, and the largest `len`.
    ctx.push_tx_hdr_raw(
        lying(MAX_PKT_BUF_SIZE + 1),
        &[
            (at(3), HDR_LEN, 0),
            (at(3) + 0x100, 2 * MAX_PKT_BUF_SIZE, 0),
        ],
    );
    ctx.push_tx_hdr_raw(
        lying(u32::MAX),
        &[(at(4), HDR_LEN, 0), (at(4) + 0x100, 0x1000, 0)],
    );
    // Data descriptor the device could write.
    ctx.push_tx_hdr_raw(
        lying(10),
        &[(at(5), HDR_LEN, 0), (at(5) + 0x100, 10, DESC_F_WRITE)],
    );
    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"ok");

    ctx.process(&mut dev);

    assert_eq!(ctx.take_used_tx().len(), 7);
    assert!(METRICS.tx_bad_desc.count() >= bad + 6);
    assert_eq!(read_n(&mut conn.stream, 2), b"ok");
    assert!(is_open_and_empty(&mut conn.stream));
    assert!(ctx.pump_rounds(&mut dev, 2).is_empty());
}

#[test]
fn test_hostile_tx_unknown_op_on_connection_reset_host_closed() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);

    ctx.push_tx(conn.hdr(0x7777), &[]);
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(conn.owns(&pkts[0]));
    assert!(is_eof(&mut conn.stream));
}

#[test]
fn test_hostile_tx_non_stream_type_request_rst_no_connection() {
    let (mut ctx, mut dev) = setup();
    let listener = UnixListener::bind(ctx.port_path(HOST_PORT)).unwrap();
    let types = [VSOCK_TYPE_SEQPACKET, VSOCK_TYPE_DGRAM, 0, 0xffff];
    for (guest_port, type_) in (7000..).zip(types) {
        let req = Hdr {
            type_,
            ..Hdr::guest(VSOCK_OP_REQUEST, guest_port, HOST_PORT)
        };
        ctx.push_tx(req, &[]);
    }

    let pkts = ctx.pump_until(&mut dev, |p| p.len() >= types.len());

    assert_eq!(ops(&pkts), [VSOCK_OP_RST; 4]);
    assert!(
        accept_now(&listener).is_none(),
        "no host connection was made"
    );
}

#[test]
fn test_hostile_tx_data_before_response_reset_host_client_closed() {
    let (mut ctx, mut dev) = setup();
    let (mut stream, req) = ctx.host_connect(&mut dev, GUEST_PORT);

    ctx.push_tx(Hdr::guest(VSOCK_OP_RW, GUEST_PORT, req.hdr.src_port), b"x");
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert_eq!(pkts[0].hdr.src_port, req.hdr.src_port);
    assert!(is_eof(&mut stream), "the host client got no OK");
}

#[test]
fn test_hostile_tx_foreign_dst_cid_dropped_without_reply() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let dropped = METRICS.tx_bad_dst_cid.count();
    let hdr = Hdr {
        dst_cid: GUEST_CID + 10,
        ..conn.hdr(VSOCK_OP_RW)
    };

    ctx.push_tx(hdr, b"elsewhere");
    let pkts = ctx.pump_rounds(&mut dev, 3);

    assert!(pkts.is_empty(), "{pkts:?}");
    assert!(is_open_and_empty(&mut conn.stream));
    assert!(METRICS.tx_bad_dst_cid.count() > dropped);
}

#[test]
fn test_hostile_tx_data_after_guest_shutdown_send_reset() {
    let (mut ctx, mut dev) = setup();
    let conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);
    let mut shutdown = conn.hdr(VSOCK_OP_SHUTDOWN);
    shutdown.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    ctx.push_tx(shutdown, &[]);

    ctx.push_tx(conn.hdr(VSOCK_OP_RW), b"late");
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(conn.owns(&pkts[0]));
}

#[test]
fn test_hostile_tx_duplicate_request_on_live_connection_reset() {
    let (mut ctx, mut dev) = setup();
    let mut conn = ctx.connect_from_guest(&mut dev, GUEST_PORT, HOST_PORT, GUEST_BUF_ALLOC);

    ctx.push_tx(conn.hdr(VSOCK_OP_REQUEST), &[]);
    let pkts = ctx.pump_until_rx(&mut dev);

    assert_eq!(ops(&pkts), [VSOCK_OP_RST]);
    assert!(is_eof(&mut conn.stream));
}
