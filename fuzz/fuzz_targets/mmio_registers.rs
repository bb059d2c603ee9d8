//! virtio-mmio register sequences: reads and writes of any offset, width and value on a block,
//! a vsock or a network device behind the in-process transport, activation and reset included. Guest
//! memory stays zeroed (rings included), so that an activated device's worker thread finds
//! nothing to do; the queues themselves are the other targets' business.
#![no_main]

use husk_devices::{BlockMmio, MmioTransport, VirtioMmioDevice, VsockConfig, VsockMmio};
use husk_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Offsets of the registers a driver uses, so that the fuzzer hits them often.
const REGISTERS: [u64; 22] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4,
];

fuzz_target!(|data: &[u8]| {
    husk_fuzz::ignore_sigpipe();
    let mut input = Input::new(data);
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else {
        return;
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut _wire = None;
    let device: Box<dyn VirtioMmioDevice> = match input.u8() % 3 {
        0 => {
            let path = dir.path().join("disk");
            let _ = std::fs::write(&path, [0u8; 4096]);
            match BlockMmio::new(&path, false, "fuzz") {
                Ok(dev) => Box::new(dev),
                Err(_) => return,
            }
        }
        1 => match husk_devices::fuzzing::net_mmio() {
            Ok((dev, wire)) => {
                _wire = Some(wire);
                Box::new(dev)
            }
            Err(_) => return,
        },
        _ => {
            let config = VsockConfig {
                guest_cid: 3,
                uds_path: dir.path().join("v.sock"),
            };
            match VsockMmio::new(&config) {
                Ok(dev) => Box::new(dev),
                Err(_) => return,
            }
        }
    };
    let Ok(mut transport) = MmioTransport::new(device, mem, irq) else {
        return;
    };
    for _ in 0..128 {
        if input.is_empty() {
            break;
        }
        access(&mut input, &mut transport);
    }
});

/// One access: `op` bit 0 read or write, bits 1-2 the width, bit 3 any offset (else one of
/// [`REGISTERS`]).
fn access(input: &mut Input<'_>, transport: &mut MmioTransport<Box<dyn VirtioMmioDevice>>) {
    let op = input.u8();
    let offset = match op & 8 {
        0 => REGISTERS[usize::from(input.u8()) % REGISTERS.len()],
        _ => u64::from(input.u16()),
    };
    let mut bytes = vec![0u8; [4usize, 1, 2, 8][usize::from(op >> 1 & 3)]];
    match op & 1 {
        0 => {
            let value = input.u32().to_le_bytes();
            for (b, v) in bytes.iter_mut().zip(value.iter().cycle()) {
                *b = *v;
            }
            transport.write(offset, &bytes);
        }
        _ => transport.read(offset, &mut bytes),
    }
}
