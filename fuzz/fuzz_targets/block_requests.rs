//! The block device's requests: raw descriptor chains (any address, length, flags, next) and
//! well-formed requests with fuzzed type, sector, data length and direction, against a small
//! backing file, read-write or read-only.
#![no_main]

use std::io::Write;

use husk_devices::fuzzing::BlockFuzz;
use husk_fuzz::{raw_desc, Guest, Input, DESC_F_WRITE, SLOT};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Sectors of the backing file (plus a partial one the guest must not see).
const DISK_SECTORS: usize = 8;
const Q: usize = 0;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    let _ = file.write_all(&[0x5a; DISK_SECTORS * 512 + 100]);
    let Ok(mut dev) = BlockFuzz::open(file.path(), mode & 1 == 1, "fuzz-disk") else {
        return;
    };
    let mut guest = Guest::new(1);
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        step(&mut input, &mut guest, &mut dev);
    }
    process(&mut guest, &mut dev);
});

fn step(input: &mut Input<'_>, guest: &mut Guest, dev: &mut BlockFuzz) {
    match input.u8() % 6 {
        0 => {
            let idx = input.u16();
            let desc = raw_desc(input);
            guest.write_desc(Q, idx, desc);
        }
        1 => {
            let head = input.u16();
            guest.push_avail(Q, head);
        }
        2 => request(input, guest),
        3 => {
            let idx = input.u16();
            guest.set_avail_idx(Q, idx);
        }
        4 => {
            // The guest rewrites a buffer (a header or data) between kicks.
            let (slot, bytes) = (input.u8(), input.blob());
            let at = guest.ring(Q).map_or(0, |r| r.slot(u16::from(slot)));
            let _ = guest.mem.write_slice(bytes, GuestAddress(at));
        }
        _ => process(guest, dev),
    }
}

/// Header (`type`, `sector`), data of a fuzzed length split over up to three descriptors, one
/// status byte; the data direction and the status descriptor's flags are fuzzed too.
fn request(input: &mut Input<'_>, guest: &mut Guest) {
    let Some(ring) = guest.ring(Q) else {
        return;
    };
    let hdr_at = ring.slot(ring.next_desc());
    let data_at = ring.slot(ring.next_desc().wrapping_add(1));
    let status_at = hdr_at + SLOT - 1;
    let (request_type, sector) = (input.u32(), input.u64());
    let (shape, data_len) = (input.u8(), u32::from(input.u16()) % 0x1000);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&request_type.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    let _ = guest.mem.write_slice(&hdr, GuestAddress(hdr_at));
    let data_flags = if shape & 1 == 1 { DESC_F_WRITE } else { 0 };
    let status_flags = if shape & 2 == 0 { DESC_F_WRITE } else { 0 };
    let hdr_len = if shape & 4 == 0 {
        16
    } else {
        u32::from(shape >> 4)
    };
    let mut descs = vec![(hdr_at, hdr_len, 0)];
    let pieces = u32::from(shape >> 3 & 3);
    let mut at = data_at;
    let mut left = data_len;
    for i in 0..pieces {
        let len = if i + 1 == pieces { left } else { left / 2 };
        descs.push((at, len, data_flags));
        at += u64::from(len);
        left -= len;
    }
    descs.push((status_at, 1, status_flags));
    guest.push_chain(Q, &descs);
}

fn process(guest: &mut Guest, dev: &mut BlockFuzz) {
    let Guest { mem, queues, .. } = guest;
    if let Some(queue) = queues.first_mut() {
        dev.process_queue(mem, queue);
    }
}
