//! What a VM run measured: when the guest first ran and what the VMM process held in memory.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

use crate::ExitReason;

/// A finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Why the guest ended.
    pub reason: ExitReason,
    /// `CLOCK_MONOTONIC` when the vCPU first came back from the guest (its first port or MMIO
    /// access, halt or error): with a payload whose first instruction is a port write, the
    /// moment the guest's first instruction ran. Comparable across processes.
    pub first_exit: Option<Duration>,
    /// This process's memory at the end of the run, guest memory still mapped.
    pub memory: MemoryUsage,
}

/// Resident memory of this process, from /proc/self/status (KiB). Guest RAM is a shared memfd,
/// so it counts as `rss_shmem`; the VMM's own memory is `rss_anon + rss_file`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Peak resident set (VmHWM).
    pub hwm_kib: u64,
    /// Anonymous memory: heap, stacks.
    pub rss_anon_kib: u64,
    /// Mapped files: the binary and its libraries.
    pub rss_file_kib: u64,
    /// Shared memory: the guest RAM the guest touched.
    pub rss_shmem_kib: u64,
}

impl MemoryUsage {
    /// This process now, from its /proc/self/status opened beforehand (the running VMM may
    /// not open files); zeros where it cannot be read.
    pub fn read(status: &mut std::fs::File) -> Self {
        // Plain reads: read_to_string would stat the file, which the confined VMM may not.
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        if status.seek(SeekFrom::Start(0)).is_ok() {
            while let Ok(n @ 1..) = status.read(&mut chunk) {
                text.extend_from_slice(&chunk[..n]);
            }
        }
        Self::parse(&String::from_utf8_lossy(&text))
    }

    fn parse(status: &str) -> Self {
        let mut usage = Self::default();
        for line in status.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(kib) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "VmHWM:" => usage.hwm_kib = kib,
                "RssAnon:" => usage.rss_anon_kib = kib,
                "RssFile:" => usage.rss_file_kib = kib,
                "RssShmem:" => usage.rss_shmem_kib = kib,
                _ => {}
            }
        }
        usage
    }
}

/// `CLOCK_MONOTONIC` now.
#[must_use]
pub fn monotonic_now() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_memory_usage_parse_status_fields() {
        let status = "Name:\thusk-vmm\nVmHWM:\t  9000 kB\nRssAnon:\t  1200 kB\n\
                      RssFile:\t  3000 kB\nRssShmem:\t  4800 kB\nThreads:\t2\n";
        assert_eq!(
            MemoryUsage::parse(status),
            MemoryUsage {
                hwm_kib: 9000,
                rss_anon_kib: 1200,
                rss_file_kib: 3000,
                rss_shmem_kib: 4800
            }
        );
    }

    #[test]
    fn test_memory_usage_read_twice_from_one_handle() {
        let mut status = std::fs::File::open("/proc/self/status").unwrap();
        assert!(MemoryUsage::read(&mut status).hwm_kib > 0);
        let usage = MemoryUsage::read(&mut status);
        assert!(usage.hwm_kib > 0 && usage.rss_anon_kib > 0);
    }
}
