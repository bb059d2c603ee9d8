//! The host's TSC frequency, which a TCG guest's TSC runs at (QEMU reads the host's TSC for
//! the guest's `rdtsc`).
//!
//! A TCG guest calibrates its TSC against the emulated PIT, and about one boot in four
//! (measured: 2 of 8) that fails under the emulation's jitter: the kernel then spends about
//! 150 ms calibrating a delay loop and runs on the jiffies clock (4 ms steps) for its whole
//! life, and so does every VM restored from a snapshot it made. `tsc_early_khz=` on the
//! command line skips that calibration.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// How long the TSC is measured against the host's clock: the bracket of each reading is
/// well under a microsecond, so the error stays under 100 ppm even on a loaded host.
const WINDOW: Duration = Duration::from_millis(10);

/// The host's TSC frequency in kHz, or `None` where there is no TSC or no clock.
pub fn host_khz() -> Option<u64> {
    let (tsc0, ns0) = reading()?;
    std::thread::sleep(WINDOW);
    let (tsc1, ns1) = reading()?;
    khz(tsc1.checked_sub(tsc0)?, ns1.checked_sub(ns0)?)
}

/// kHz from `ticks` counted in `ns` nanoseconds; `None` for a nonsensical reading.
fn khz(ticks: u64, ns: u64) -> Option<u64> {
    let khz = u128::from(ticks) * 1_000_000 / u128::from(ns.max(1));
    // From 100 MHz to 10 GHz: anything else is not a TSC worth trusting.
    u64::try_from(khz)
        .ok()
        .filter(|k| (100_000..=10_000_000).contains(k))
}

/// A TSC value and the raw monotonic clock (no NTP slewing) read as close together as this
/// host allows: the tightest of a few TSC brackets around the clock read.
fn reading() -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..5 {
        let before = tsc();
        let now = clock_gettime(ClockId::CLOCK_MONOTONIC_RAW).ok()?;
        let after = tsc();
        let width = after.checked_sub(before)?;
        let ns = u64::try_from(now.tv_sec()).ok()? * 1_000_000_000
            + u64::try_from(now.tv_nsec()).ok()?;
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, before + width / 2, ns));
        }
    }
    best.map(|(_, tsc, ns)| (tsc, ns))
}

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: rdtsc reads a counter; it touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_khz_from_ticks_and_time() {
        assert_eq!(khz(26_000_000, 10_000_000), Some(2_600_000));
        assert_eq!(khz(0, 10_000_000), None);
        assert_eq!(khz(u64::MAX, 1), None);
    }

    #[test]
    fn test_host_khz_is_plausible_here() {
        // This host has a TSC; two measurements agree within 1%.
        let a = host_khz().expect("a TSC");
        let b = host_khz().expect("a TSC");
        assert!(a.abs_diff(b) * 100 < a, "{a} vs {b}");
    }
}
