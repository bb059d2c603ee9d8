//! The one place of this crate that needs `unsafe`: tying helper processes to our lifetime.

use nix::sys::signal::Signal;

/// Makes `cmd`'s child receive SIGKILL when the thread that spawned it dies, so that a VMM or
/// helper never outlives a killed husk (even on SIGKILL of husk, where no cleanup code runs).
/// Callers spawn from the runtime's main thread (husk uses a current-thread tokio runtime).
pub(crate) fn kill_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec; it only calls prctl(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
