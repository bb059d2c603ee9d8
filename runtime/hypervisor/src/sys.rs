//! The one place of this crate that needs `unsafe`: tying helper processes to our lifetime.

use nix::sys::signal::Signal;

/// Makes `cmd`'s child receive SIGKILL when the thread that spawned it dies, so that a VMM or
/// helper never outlives a killed husk (even on SIGKILL of husk, where no cleanup code runs).
/// Callers spawn from the runtime's main thread (husk uses a current-thread tokio runtime).
///
/// The child also inherits no descriptor but its stdio and the `kept` ones from 3 up (mapped
/// there for it, as the jail launcher's passed files): a VMM or helper holding, say, the
/// containerd shim's listening socket would keep it answering after the shim died, and
/// containerd's cleanup would take the dead shim for a live one.
pub(crate) fn kill_with_parent(cmd: &mut tokio::process::Command, kept: u32) {
    // SAFETY: the closure runs between fork and exec; it only calls prctl(2) and
    // close_range(2), which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Every descriptor from 3 up but the `kept` passed ones closes at exec (a kernel
            // before 5.11 lacks the call: then as before).
            let _ = libc::syscall(
                libc::SYS_close_range,
                3u32.saturating_add(kept),
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
