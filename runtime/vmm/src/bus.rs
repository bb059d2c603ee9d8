//! Port-IO and MMIO buses: address ranges mapped to devices.

use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the start of its range; `data` has the access
/// width (1, 2, 4 or 8 bytes) and comes from (or goes to) a hostile guest.
pub trait BusDevice: Send {
    /// A guest read; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Ranges do not overlap; lookups are a linear scan (a handful of devices).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|r| (r.base, r.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// Maps `device` at `[base, base + len)`; refuses an empty or overlapping range.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), String> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or("empty or wrapping range")?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(format!("range {base:#x}+{len:#x} overlaps another device"));
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, width: usize) -> Option<(&Range, u64)> {
        let width = u64::try_from(width).ok()?;
        self.ranges.iter().find_map(|r| {
            let offset = addr.checked_sub(r.base)?;
            (offset.checked_add(width)? <= r.len).then_some((r, offset))
        })
    }

    /// A guest read; unmapped addresses read as all ones (as an open bus). Returns whether a
    /// device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write; unmapped addresses ignore it. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg(u8);

    impl BusDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn test_bus_insert_overlap_rejected() {
        let mut bus = Bus::default();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Reg::default())))
            .unwrap();
        assert!(bus
            .insert(0x17, 2, Arc::new(Mutex::new(Reg::default())))
            .is_err());
        assert!(bus
            .insert(0x18, 0, Arc::new(Mutex::new(Reg::default())))
            .is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Reg::default())))
            .is_err());
        assert!(bus
            .insert(0x18, 2, Arc::new(Mutex::new(Reg::default())))
            .is_ok());
    }

    #[test]
    fn test_bus_access_across_range_end_unmapped() {
        let mut bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(7)))).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x10, &mut data));
        assert_eq!(data, [7; 4]);
        assert!(
            !bus.read(0x12, &mut data),
            "a read straddling the end is not the device's"
        );
        assert_eq!(data, [0xff; 4]);
        assert!(bus.write(0x13, &[9]));
        assert!(!bus.write(0x14, &[9]));
    }
}
