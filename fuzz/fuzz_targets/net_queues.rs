//! The network device's queues, driven by a hostile driver: raw descriptors (any address,
//! length, flags, next), avail entries, transmit chains of any length with any header (in one
//! or two descriptors), receive buffers of any size and direction, frames from the host of
//! any length, and device resets; with and without mergeable receive buffers.
#![no_main]

use husk_devices::fuzzing::NetFuzz;
use husk_fuzz::{raw_desc, Guest, Input, DESC_F_WRITE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const RXQ: usize = 0;
const TXQ: usize = 1;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(mut dev) = NetFuzz::new(input.u8() & 1 == 1) else {
        return;
    };
    let mut guest = Guest::new(2);
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        step(&mut input, &mut guest, &mut dev);
    }
    process(&mut guest, &mut dev);
    dev.host_drains();
});

fn step(input: &mut Input<'_>, guest: &mut Guest, dev: &mut NetFuzz) {
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
        2 => tx_frame(input, guest),
        3 => {
            let (len, flags) = (u32::from(input.u16()) % 0x1000, input.u8());
            let flags = if flags & 1 == 0 { DESC_F_WRITE } else { 0 };
            guest.push_buffer(RXQ, len, flags);
        }
        4 => {
            let q = usize::from(input.u8() & 1);
            let idx = input.u16();
            guest.set_avail_idx(q, idx);
        }
        5 => {
            // A frame from the host: a fuzzed length (runts and jumbo frames included).
            let len = usize::from(input.u16()) % 0x2000;
            let fill = input.u8();
            dev.host_sends(&vec![fill; len]);
        }
        6 => dev.reset(),
        _ => process(guest, dev),
    }
}

/// A transmit chain: header and frame (both fuzzed bytes) in one descriptor or split in two.
fn tx_frame(input: &mut Input<'_>, guest: &mut Guest) {
    let Some(ring) = guest.ring(TXQ) else {
        return;
    };
    let shape = input.u8();
    let bytes = input.blob();
    let addr = ring.slot(ring.next_desc());
    let _ = guest.mem.write_slice(bytes, GuestAddress(addr));
    let len = u32::try_from(bytes.len()).unwrap_or(0) + u32::from(shape >> 2);
    let descs = match shape & 3 {
        0 => vec![(addr, len, 0)],
        1 => vec![
            (addr, 12.min(len), 0),
            (addr + 12, len.saturating_sub(12), 0),
        ],
        // A write-only descriptor in a transmit chain.
        2 => vec![(addr, len, DESC_F_WRITE)],
        _ => vec![(addr, 12, 0), (addr + 0x100, len, DESC_F_WRITE)],
    };
    guest.push_chain(TXQ, &descs);
}

fn process(guest: &mut Guest, dev: &mut NetFuzz) {
    let Guest { mem, queues, .. } = guest;
    if let [rxq, txq] = queues.as_mut_slice() {
        dev.process(mem, rxq, txq);
    }
}
