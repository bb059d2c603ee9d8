//! The thread an in-process device serves its queues on: the device model is held here while
//! the device is idle, handed to a worker thread on activation, and given back (and reset by
//! its owner) when the driver resets the device or the VM ends. Shared by the block, vsock and
//! network devices of the built-in VMM.

use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::rate_limited::warn_rate_limited;

/// A device model `T`, idle or on its worker thread.
pub(crate) struct WorkerSlot<T> {
    /// Names the thread and the log lines.
    name: &'static str,
    /// The device while no worker runs.
    idle: Option<T>,
    /// The running worker: its stop event and the thread, which returns the device.
    running: Option<(EventFd, JoinHandle<T>)>,
}

impl<T> std::fmt::Debug for WorkerSlot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSlot")
            .field("name", &self.name)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl<T: Send + 'static> WorkerSlot<T> {
    /// An idle `device`; `name` (`block`, `vsock`, `net`) names its thread `<name>-mmio`.
    pub(crate) fn new(name: &'static str, device: T) -> Self {
        Self {
            name,
            idle: Some(device),
            running: None,
        }
    }

    /// The device, while no worker has it.
    pub(crate) fn idle_mut(&mut self) -> Option<&mut T> {
        self.idle.as_mut()
    }

    /// Whether a worker serves the device.
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Runs `serve(device, stop)` on a thread of its own: it serves until `stop` is readable
    /// and returns the device. (If no thread can be made, the device is gone: the host is
    /// out of resources, and the transport reports that the device needs a reset.)
    ///
    /// # Errors
    /// A worker already runs, the device is gone, or the stop event or the thread cannot be
    /// made.
    pub(crate) fn start(
        &mut self,
        serve: impl FnOnce(T, EventFd) -> T + Send + 'static,
    ) -> Result<(), String> {
        if self.running.is_some() {
            return Err(format!("{} device already active", self.name));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let worker_stop = stop.try_clone().map_err(|e| e.to_string())?;
        let device = self
            .idle
            .take()
            .ok_or_else(|| format!("{} device gone", self.name))?;
        let handle = std::thread::Builder::new()
            .name(format!("{}-mmio", self.name))
            .spawn(move || serve(device, worker_stop))
            .map_err(|e| format!("{} worker thread: {e}", self.name))?;
        self.running = Some((stop, handle));
        Ok(())
    }

    /// Stops the worker, if one runs, and takes the device back; returns it (for its owner's
    /// reset) when a worker had it.
    pub(crate) fn stop(&mut self) -> Option<&mut T> {
        let (stop, handle) = self.running.take()?;
        let _ = stop.write(1);
        match handle.join() {
            Ok(device) => {
                self.idle = Some(device);
                self.idle.as_mut()
            }
            Err(_) => {
                warn_rate_limited!(device = self.name, "worker thread panicked; device gone");
                None
            }
        }
    }
}
