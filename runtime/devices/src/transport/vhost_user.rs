//! vhost-user transport for the vsock device: QEMU's `-device vhost-user-vsock-device`.
//!
//! QEMU (the frontend) owns the virtio transport and the event queue; it shares guest memory
//! (memfd, `share=on`) and hands us the RX and TX vrings with their kick/call eventfds. This
//! adapter only maps those onto [`Vsock::process_queues`]: vring kicks and the backend's nested
//! epoll fd are served by one vhost-user-backend worker thread, which is the only thread that
//! touches the device while the session runs.
//!
//! Negotiation: `VIRTIO_F_VERSION_1`, `VIRTIO_F_NOTIFY_ON_EMPTY`, `VIRTIO_RING_F_EVENT_IDX` and
//! `VHOST_USER_F_PROTOCOL_FEATURES`; protocol feature `CONFIG`, which QEMU requires to read the
//! guest CID (`struct virtio_vsock_config`). Like vhost-device-vsock we declare the three vsock
//! queues and process RX and TX; QEMU never hands over the event queue.
//!
//! Lifecycle: [`spawn_vhost_user_vsock`] binds both sockets and starts a session thread that
//! accepts one frontend and serves it until it disconnects or [`VsockDaemon::shutdown`] asks it
//! to stop; then the workers exit, every Unix stream is closed and both socket files are
//! removed. Writes to host streams whose peer is gone return `EPIPE` because Rust programs
//! ignore `SIGPIPE`.

use std::fmt;
use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    Error as DaemonError, ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock,
    VringState, VringT,
};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limited::warn_rate_limited;
use crate::vsock::defs::{MAX_QUEUE_SIZE, NUM_QUEUES, RXQ_INDEX, TXQ_INDEX};
use crate::vsock::device::{VirtioVsockConfig, Vsock};
use crate::vsock::metrics::METRICS;
use crate::vsock::unix::VsockUnixBackend;
use crate::vsock::{VsockConfig, VsockEpollListener, VsockError};

/// Event id of the backend's nested epoll fd; ids up to `NUM_QUEUES` are reserved for the vrings
/// and the exit event.
const BACKEND_EVENT: u16 = 4;
const _: () = assert!(BACKEND_EVENT as usize == NUM_QUEUES + 1);
/// Event id of [`VhostUserVsockBackend::retry`]: processing stopped at its budget with work left.
const RETRY_EVENT: u16 = 5;
/// The worker thread handles RX (bit 0) and TX (bit 1); the event queue stays with QEMU.
const QUEUE_MASK: u64 = 0b11;
const SESSION_THREAD: &str = "vsock-vhost-user";
/// How long [`VsockDaemon::shutdown`] waits for the session and its workers to end. Each
/// worker call is bounded (`MAX_CHAINS_PER_CALL`), so this is only a backstop.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vhost-user face of one vsock device.
struct VhostUserVsockBackend {
    /// `None` once the session ended: the device (and every host stream) is gone.
    device: Mutex<Option<Vsock<VsockUnixBackend>>>,
    config: VirtioVsockConfig,
    /// Shared with the vhost-user handler, which swaps in QEMU's memory on SET_MEM_TABLE.
    mem: GuestMemory,
    /// Written when a call stopped at its budget, so that the worker comes back to the queues
    /// after serving its other events (the exit event among them) instead of looping.
    retry: EventFd,
}

impl VhostUserVsockBackend {
    fn lock(&self) -> MutexGuard<'_, Option<Vsock<VsockUnixBackend>>> {
        // A panic while holding the lock cannot leave the device half-updated in a way that
        // matters more than stopping service; keep going.
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the device: closes every host stream and the `uds_path` listener (removing it).
    fn stop(&self) {
        self.lock().take();
    }
}

impl VhostUserBackend for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        if let Some(device) = self.lock().as_mut() {
            device.reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The handler sets it on each vring's `Queue`, which is where the device reads it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // Same `GuestMemoryAtomic` as `self.mem`, already updated by the handler.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![QUEUE_MASK]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// Never fails: an error here would end the worker thread and silently kill the device.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut guard = self.lock();
        let Some(device) = guard.as_mut() else {
            return Ok(());
        };
        match device_event {
            BACKEND_EVENT => device.notify_backend(evset),
            RETRY_EVENT => {
                let _ = self.retry.read();
            }
            event if usize::from(event) == RXQ_INDEX || usize::from(event) == TXQ_INDEX => {}
            event => {
                warn_rate_limited!(event, "vsock: unexpected vhost-user event");
                return Ok(());
            }
        }
        if process_vrings(device, &self.mem, vrings) {
            let _ = self.retry.write(1);
        }
        Ok(())
    }
}

/// Serves both queues once; returns whether there is work left (see [`RETRY_EVENT`]).
///
/// A queue the guest corrupted stops the device (counted and logged by it). vhost-user has no
/// way for us to set `DEVICE_NEEDS_RESET` in QEMU's device status (vhost-user-backend keeps the
/// vring error fd to itself), so the guest just gets no more service until it resets the
/// device.
fn process_vrings(
    device: &mut Vsock<VsockUnixBackend>,
    mem: &GuestMemory,
    vrings: &[VringRwLock],
) -> bool {
    let (Some(rx), Some(tx)) = (vrings.get(RXQ_INDEX), vrings.get(TXQ_INDEX)) else {
        return false;
    };
    let mut rx = rx.get_mut();
    let mut tx = tx.get_mut();
    if !vring_ready(&rx) || !vring_ready(&tx) {
        // Before the driver is up, host clients wait in the backend.
        return false;
    }
    let mem = mem.memory();
    let activity = device.process_queues(&*mem, rx.get_queue_mut(), tx.get_queue_mut());
    if activity.rx_used {
        signal_used(&mut rx);
    }
    if activity.tx_used {
        signal_used(&mut tx);
    }
    activity.more
}

fn vring_ready(vring: &VringState<GuestMemory>) -> bool {
    vring.get_queue().ready() && vring.is_enabled()
}

fn signal_used(vring: &mut VringState<GuestMemory>) {
    let needed = match vring.needs_notification() {
        Ok(needed) => needed,
        Err(e) => {
            METRICS.queue_errors.inc();
            warn_rate_limited!(error = %e, "vsock: failed to check notification need");
            true
        }
    };
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            METRICS.queue_errors.inc();
            warn_rate_limited!(error = %e, "vsock: failed to signal used queue");
        }
    }
}

/// Stop request shared between [`VsockDaemon`] and the session thread.
#[derive(Default)]
struct SessionControl {
    state: Mutex<ControlState>,
}

#[derive(Default)]
struct ControlState {
    stop: bool,
    handle: Option<ShutdownHandle>,
}

impl SessionControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop_requested(&self) -> bool {
        self.lock().stop
    }

    /// Records the connected session; shuts it down at once if a stop came first.
    fn set_session(&self, handle: Option<ShutdownHandle>) {
        let mut state = self.lock();
        if state.stop {
            if let Some(handle) = &handle {
                handle.shutdown();
            }
        }
        state.handle = handle;
    }

    /// Requests a stop; returns whether a connected session was told to shut down.
    fn request_stop(&self) -> bool {
        let mut state = self.lock();
        state.stop = true;
        state
            .handle
            .as_ref()
            .map(ShutdownHandle::shutdown)
            .is_some()
    }
}

/// A vhost-user vsock device being served on its own threads.
///
/// Stops on [`VsockDaemon::shutdown`], on drop, or by itself when the frontend disconnects;
/// stopping closes every host stream and removes both socket files.
pub struct VsockDaemon {
    session: Option<JoinHandle<Result<(), VsockError>>>,
    /// Disconnected when the session thread ends (so that a stop can wait with a deadline).
    session_done: Receiver<()>,
    control: Arc<SessionControl>,
    vhost_socket: PathBuf,
    uds_path: PathBuf,
}

impl fmt::Debug for VsockDaemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockDaemon")
            .field("vhost_socket", &self.vhost_socket)
            .field("uds_path", &self.uds_path)
            .field("running", &self.session.is_some())
            .finish()
    }
}

/// Binds the hybrid-vsock listener at `config.uds_path` and a vhost-user listener at
/// `vhost_socket`, then serves one vhost-user frontend (QEMU
/// `-device vhost-user-vsock-device,chardev=...`) on its own threads.
///
/// Both sockets are listening when this returns. Host processes may connect to
/// `config.uds_path` before the guest is up; their `CONNECT` waits until the driver is ready.
///
/// # Errors
/// [`VsockError::InvalidCid`], [`VsockError::BindListener`], [`VsockError::BindVhostUser`],
/// [`VsockError::CreateFd`], [`VsockError::RegisterFd`], [`VsockError::CreateDaemon`],
/// [`VsockError::SpawnThread`]. Nothing stays bound on error.
///
/// # Examples
/// ```no_run
/// use std::path::{Path, PathBuf};
/// use husk_devices::{spawn_vhost_user_vsock, VsockConfig};
///
/// let config = VsockConfig { guest_cid: 3, uds_path: PathBuf::from("/run/husk/c1/vsock.sock") };
/// let daemon = spawn_vhost_user_vsock(config, Path::new("/run/husk/c1/vhost-vsock.sock"))?;
/// // qemu-system-x86_64 ... -chardev socket,id=vsock0,path=/run/husk/c1/vhost-vsock.sock
/// //   -device vhost-user-vsock-device,chardev=vsock0
/// daemon.shutdown()?;
/// # Ok::<(), husk_devices::VsockError>(())
/// ```
pub fn spawn_vhost_user_vsock(
    config: VsockConfig,
    vhost_socket: &Path,
) -> Result<VsockDaemon, VsockError> {
    config.validate()?;
    let muxer = VsockUnixBackend::new(config.guest_cid, &config.uds_path)?;
    let backend_fd = muxer.as_raw_fd();
    let device = Vsock::new(config.guest_cid, muxer);
    let backend_evset = device.backend().get_polled_evset();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let retry = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VsockError::CreateFd {
        what: "vsock retry event",
        source,
    })?;
    let retry_fd = retry.as_raw_fd();
    let backend = Arc::new(VhostUserVsockBackend {
        config: device.config(),
        device: Mutex::new(Some(device)),
        mem: mem.clone(),
        retry,
    });
    let daemon =
        VhostUserDaemon::new(SESSION_THREAD.to_owned(), backend.clone(), mem).map_err(|e| {
            VsockError::CreateDaemon {
                reason: e.to_string(),
            }
        })?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(backend_fd, backend_evset, u64::from(BACKEND_EVENT))
            .map_err(|source| VsockError::RegisterFd {
                what: "vsock backend",
                source,
            })?;
        handler
            .register_listener(retry_fd, EventSet::IN, u64::from(RETRY_EVENT))
            .map_err(|source| VsockError::RegisterFd {
                what: "vsock retry event",
                source,
            })?;
    }
    let listener =
        Listener::new(vhost_socket, true).map_err(|source| VsockError::BindVhostUser {
            path: vhost_socket.to_path_buf(),
            source,
        })?;
    let control = Arc::new(SessionControl::default());
    let (done, session_done) = mpsc::channel::<()>();
    let session_control = control.clone();
    let session = thread::Builder::new()
        .name(SESSION_THREAD.to_owned())
        .spawn(move || {
            let _done = done;
            run_session(daemon, listener, &backend, &session_control)
        })
        .map_err(|source| VsockError::SpawnThread {
            name: SESSION_THREAD,
            source,
        })?;
    info!(guest_cid = config.guest_cid, uds_path = %config.uds_path.display(),
          vhost_socket = %vhost_socket.display(), "vhost-user vsock device listening");
    Ok(VsockDaemon {
        session: Some(session),
        session_done,
        control,
        vhost_socket: vhost_socket.to_path_buf(),
        uds_path: config.uds_path,
    })
}

/// Serves one frontend, then tears everything down in dependency order.
fn run_session(
    mut daemon: VhostUserDaemon<Arc<VhostUserVsockBackend>>,
    mut listener: Listener,
    backend: &VhostUserVsockBackend,
    control: &SessionControl,
) -> Result<(), VsockError> {
    let result = serve(&mut daemon, &mut listener, control);
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins the vring worker threads.
    drop(daemon);
    backend.stop();
    // Dropping the listener removes the vhost-user socket file.
    drop(listener);
    METRICS.log_summary();
    info!("vhost-user vsock device stopped");
    result
}

fn serve(
    daemon: &mut VhostUserDaemon<Arc<VhostUserVsockBackend>>,
    listener: &mut Listener,
    control: &SessionControl,
) -> Result<(), VsockError> {
    if control.stop_requested() {
        return Ok(());
    }
    // Blocks until a frontend connects (or `VsockDaemon::stop` connects to wake us).
    if let Err(e) = daemon.start(listener) {
        return session_result(Err(e), control);
    }
    control.set_session(daemon.shutdown_handle());
    if !control.stop_requested() {
        info!("vhost-user frontend connected");
    }
    session_result(daemon.wait(), control)
}

/// A frontend hanging up, or any error after we asked to stop, is a normal end.
fn session_result(
    result: Result<(), DaemonError>,
    control: &SessionControl,
) -> Result<(), VsockError> {
    match result {
        Ok(()) => Ok(()),
        Err(_) if control.stop_requested() => Ok(()),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(VsockError::Session {
            reason: e.to_string(),
        }),
    }
}

impl VsockDaemon {
    /// Blocks until the session ends (the frontend hung up or failed); dropping the daemon
    /// then removes the socket files (`husk-vmm vhost-vsock`, a process serving one VM).
    pub fn wait_session(&self) {
        let _ = self.session_done.recv();
    }

    /// Stops the session and its threads, closes every host stream and removes both socket
    /// files.
    ///
    /// Waits at most a few seconds: a session that does not end by then is left behind.
    ///
    /// # Errors
    /// [`VsockError::ThreadPanicked`], [`VsockError::StopTimeout`], [`VsockError::RemoveSocket`], or the
    /// [`VsockError::Session`] error that ended the session earlier.
    pub fn shutdown(mut self) -> Result<(), VsockError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), VsockError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if !self.control.request_stop() {
            // Wake a session still blocked in accept(); refused if it already ended.
            let _ = UnixStream::connect(&self.vhost_socket);
        }
        if let Err(RecvTimeoutError::Timeout) = self.session_done.recv_timeout(STOP_TIMEOUT) {
            // Never wait on the guest: whatever still runs there is left behind.
            warn!(
                timeout_ms = STOP_TIMEOUT.as_millis(),
                "vhost-user vsock device did not stop in time"
            );
            remove_socket(&self.vhost_socket)?;
            remove_socket(&self.uds_path)?;
            return Err(VsockError::StopTimeout {
                name: SESSION_THREAD,
                timeout_ms: STOP_TIMEOUT.as_millis(),
            });
        }
        let result = session.join().map_err(|_| VsockError::ThreadPanicked {
            name: SESSION_THREAD,
        })?;
        remove_socket(&self.vhost_socket)?;
        remove_socket(&self.uds_path)?;
        result
    }
}

impl Drop for VsockDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!(error = %e, "failed to stop vhost-user vsock device");
        }
    }
}

/// Removes a socket file the session may already have removed.
fn remove_socket(path: &Path) -> Result<(), VsockError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VsockError::RemoveSocket {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}
