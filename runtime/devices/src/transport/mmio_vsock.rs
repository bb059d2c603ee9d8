//! The vsock device in process, behind the virtio-mmio transport: the same
//! [`Vsock`]/[`VsockUnixBackend`] code that serves QEMU over vhost-user, driven by a worker
//! thread that waits on the queue kicks and the backend's epoll fd.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{Interrupt, QueuePosition, VirtioMmioDevice};
use super::worker::WorkerSlot;
use crate::rate_limited::warn_rate_limited;
use crate::vsock::defs::{EVQ_INDEX, MAX_QUEUE_SIZE, NUM_QUEUES, RXQ_INDEX, TXQ_INDEX};
use crate::vsock::device::{send_transport_reset, Vsock};
use crate::vsock::unix::VsockUnixBackend;
use crate::vsock::{VsockConfig, VsockEpollListener, VsockError};

/// Virtio device id of vsock.
const VIRTIO_ID_VSOCK: u32 = 19;
/// VIRTIO_F_VERSION_1: the only feature (no event index: every used buffer interrupts).
const FEATURES: u64 = 1 << 32;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [MAX_QUEUE_SIZE; NUM_QUEUES];

const EV_STOP: u64 = 100;
// The worker splits `queues` as `[rx, tx, ..]`.
const _: () = assert!(RXQ_INDEX == 0 && TXQ_INDEX == 1);
const EV_BACKEND: u64 = 101;

/// A vsock device for the built-in VMM.
pub struct VsockMmio {
    guest_cid: u64,
    worker: WorkerSlot<Vsock<VsockUnixBackend>>,
    /// Where the last worker left the queues (for [`VirtioMmioDevice::pause`]).
    positions: Arc<Mutex<Option<Vec<QueuePosition>>>>,
    /// The next activation is a restore's: the worker first sends a transport reset.
    restored: bool,
}

impl std::fmt::Debug for VsockMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMmio")
            .field("guest_cid", &self.guest_cid)
            .field("active", &self.worker.is_running())
            .finish()
    }
}

impl VsockMmio {
    /// A device for `config` (binds the host-side Unix socket now, so host clients can
    /// connect and wait while the guest boots).
    ///
    /// # Errors
    /// An invalid CID, or the socket cannot be bound.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate()?;
        let backend = VsockUnixBackend::new(config.guest_cid, &config.uds_path)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            worker: WorkerSlot::new("vsock", Vsock::new(config.guest_cid, backend)),
            positions: Arc::default(),
            restored: false,
        })
    }

    fn stop_worker(&mut self) {
        if let Some(device) = self.worker.stop() {
            device.reset();
        }
    }
}

impl Drop for VsockMmio {
    fn drop(&mut self) {
        self.stop_worker();
        crate::vsock::metrics::METRICS.log_summary();
    }
}

impl VirtioMmioDevice for VsockMmio {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.guest_cid.to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| cid.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        let positions = self.positions.clone();
        let restored = std::mem::take(&mut self.restored);
        self.worker.start(move |device, stop| {
            let mut queues = queues;
            if restored && transport_reset(&mem, &mut queues, &interrupt) {
                await_reset_ack(&kicks, &stop);
            }
            let device = worker(device, &mem, &mut queues, kicks, &interrupt, stop);
            let at = queues.iter().map(QueuePosition::of).collect();
            *positions.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
            device
        })
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
        if self.worker.stop().is_none() {
            return Err("vsock device is not active".into());
        }
        self.positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| "vsock worker left no queue positions".into())
    }

    fn restoring(&mut self) {
        self.restored = true;
    }
}

/// Sends the transport reset event of a restored device (its host connections are not the
/// saved VM's); returns whether it was sent. A driver without an event buffer, or a broken
/// event queue, is logged.
fn transport_reset(mem: &GuestMemoryMmap, queues: &mut [Queue], interrupt: &Interrupt) -> bool {
    let Some(evq) = queues.get_mut(EVQ_INDEX) else {
        return false;
    };
    match send_transport_reset(mem, evq) {
        Ok(true) => {
            interrupt.signal_used();
            true
        }
        Ok(false) => {
            warn_rate_limited!("vsock: no event buffer for the transport reset");
            false
        }
        Err(e) => {
            warn_rate_limited!(error = %e, "vsock: event queue broken");
            interrupt.signal_needs_reset();
            false
        }
    }
}

/// How long a restored device waits for the driver to take its transport reset.
const RESET_ACK_TIMEOUT_MS: i32 = 5000;

/// Waits until the driver has handled the transport reset (it gives the event buffer back and
/// notifies the event queue), `stop`, or [`RESET_ACK_TIMEOUT_MS`]: until then the device takes
/// no host connection, which the reset, handled late, would otherwise tear down too.
fn await_reset_ack(kicks: &[EventFd], stop: &EventFd) {
    let Some(evq_kick) = kicks.get(EVQ_INDEX) else {
        return;
    };
    let Ok(epoll) = Epoll::new() else {
        return;
    };
    for (fd, data) in [(evq_kick.as_raw_fd(), 0), (stop.as_raw_fd(), EV_STOP)] {
        let _ = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, data),
        );
    }
    let mut events = [EpollEvent::default(); 2];
    match epoll.wait(RESET_ACK_TIMEOUT_MS, &mut events) {
        Ok(0) => warn_rate_limited!("vsock: the driver did not take the transport reset in time"),
        Ok(_) => {}
        Err(e) => warn_rate_limited!(error = %e, "vsock: waiting for the transport reset"),
    }
}

/// Serves the queues until `stop`; gives the device back.
fn worker(
    mut device: Vsock<VsockUnixBackend>,
    mem: &GuestMemoryMmap,
    queues: &mut [Queue],
    kicks: Vec<EventFd>,
    interrupt: &Interrupt,
    stop: EventFd,
) -> Vsock<VsockUnixBackend> {
    let Ok(epoll) = Epoll::new() else {
        warn_rate_limited!("vsock: epoll_create failed; device stays silent");
        return device;
    };
    let add = |fd: i32, data: u64, evset: EventSet| {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(evset, data)) {
            warn_rate_limited!(error = %e, "vsock: epoll_ctl failed");
        }
    };
    for (i, kick) in (0u64..).zip(&kicks) {
        add(kick.as_raw_fd(), i, EventSet::IN);
    }
    add(stop.as_raw_fd(), EV_STOP, EventSet::IN);
    add(
        device.backend().as_raw_fd(),
        EV_BACKEND,
        device.backend().get_polled_evset(),
    );
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return device,
        };
        for event in &events[..n] {
            match event.data() {
                EV_STOP => return device,
                EV_BACKEND => device.notify_backend(event.event_set()),
                i => {
                    if let Some(kick) = usize::try_from(i).ok().and_then(|i| kicks.get(i)) {
                        let _ = kick.read();
                    }
                }
            }
        }
        let [rx, tx, ..] = &mut *queues else {
            return device;
        };
        let activity = device.process_queues(mem, rx, tx);
        if activity.rx_used || activity.tx_used {
            interrupt.signal_used();
        }
        if activity.broke {
            interrupt.signal_needs_reset();
        }
        if let (true, Some(kick)) = (activity.more, kicks.get(TXQ_INDEX)) {
            // Come back after looking at the stop event.
            let _ = kick.write(1);
        }
    }
}
