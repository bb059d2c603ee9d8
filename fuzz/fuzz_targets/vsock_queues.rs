//! The vsock device's queues, driven by a hostile driver: raw descriptors (any address,
//! length, flags, next), avail entries, well-formed packets with fuzzed header fields and
//! payload, RX buffers, device resets and host-side events, over a real hybrid-vsock backend.
#![no_main]

use husk_devices::fuzzing::VsockFuzz;
use husk_fuzz::{raw_desc, Guest, Input, DESC_F_WRITE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const HDR_LEN: u32 = 44;

fuzz_target!(|data: &[u8]| {
    husk_fuzz::ignore_sigpipe();
    let dir = tempfile::tempdir().expect("temp dir");
    let Ok(mut dev) = VsockFuzz::new(GUEST_CID, &dir.path().join("v.sock")) else {
        return;
    };
    let mut guest = Guest::new(2);
    let mut input = Input::new(data);
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        step(&mut input, &mut guest, &mut dev);
    }
    process(&mut guest, &mut dev);
});

fn step(input: &mut Input<'_>, guest: &mut Guest, dev: &mut VsockFuzz) {
    match input.u8() % 8 {
        0 => {
            let q = usize::from(input.u8() & 1);
            let idx = input.u16();
            let desc = raw_desc(input);
            guest.write_desc(q, idx, desc);
        }
        1 => {
            let q = usize::from(input.u8() & 1);
            let head = input.u16();
            guest.push_avail(q, head);
        }
        2 => tx_packet(input, guest),
        3 => {
            for _ in 0..input.u8() % 4 + 1 {
                guest.push_buffer(RXQ, HDR_LEN + 4096, DESC_F_WRITE);
            }
        }
        4 => {
            let q = usize::from(input.u8() & 1);
            let idx = input.u16();
            guest.set_avail_idx(q, idx);
        }
        5 => dev.notify_backend(),
        6 => dev.reset(),
        _ => process(guest, dev),
    }
}

/// A TX chain: a header with fuzzed fields (source CID right or wrong), then the payload in
/// one or two descriptors.
fn tx_packet(input: &mut Input<'_>, guest: &mut Guest) {
    let Some(ring) = guest.ring(TXQ) else {
        return;
    };
    let flags = input.u8();
    let src_cid = if flags & 1 == 0 {
        GUEST_CID
    } else {
        input.u64()
    };
    let payload = input.blob();
    let hdr_len_field = match flags & 2 {
        0 => u32::try_from(payload.len()).unwrap_or(0),
        _ => input.u32(),
    };
    let mut hdr = Vec::with_capacity(44);
    hdr.extend_from_slice(&src_cid.to_le_bytes());
    hdr.extend_from_slice(&2u64.to_le_bytes());
    hdr.extend_from_slice(&input.u32().to_le_bytes()); // src_port
    hdr.extend_from_slice(&input.u32().to_le_bytes()); // dst_port
    hdr.extend_from_slice(&hdr_len_field.to_le_bytes());
    hdr.extend_from_slice(&input.u16().to_le_bytes()); // type
    hdr.extend_from_slice(&input.u16().to_le_bytes()); // op
    hdr.extend_from_slice(&input.u32().to_le_bytes()); // flags
    hdr.extend_from_slice(&input.u32().to_le_bytes()); // buf_alloc
    hdr.extend_from_slice(&input.u32().to_le_bytes()); // fwd_cnt
    let addr = ring.slot(ring.next_desc());
    let _ = guest.mem.write_slice(&hdr, GuestAddress(addr));
    let _ = guest.mem.write_slice(payload, GuestAddress(addr + 0x100));
    let plen = u32::try_from(payload.len()).unwrap_or(0);
    let mut descs = vec![(addr, HDR_LEN, 0)];
    if flags & 4 != 0 && plen > 0 {
        descs.push((addr + 0x100, plen, 0));
    }
    guest.push_chain(TXQ, &descs);
}

fn process(guest: &mut Guest, dev: &mut VsockFuzz) {
    let Guest { mem, queues, .. } = guest;
    if let [rxq, txq] = queues.as_mut_slice() {
        dev.process_queues(mem, rxq, txq);
    }
}
