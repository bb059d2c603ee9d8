//! virtio-fs for the built-in VMM: the device is virtiofsd (the same one the QEMU door uses),
//! reached over vhost-user; this is the frontend that hands it the guest memory and the queues,
//! and relays its "used buffers" signals to the guest through the virtio-mmio transport.

use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::transport::mmio::{Interrupt, QueuePosition, VirtioMmioDevice};

const VIRTIO_ID_FS: u32 = 26;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// One high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
/// How long activation may wait for virtiofsd in all (it runs on a vCPU thread); virtiofsd
/// answers in microseconds, a stalled or hostile one makes the device need a reset instead.
const SETUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest tag in the config space (virtio 1.2 §5.11.4).
const TAG_LEN: usize = 36;
const EV_STOP: u64 = u64::MAX;

/// A virtio-fs device served by a vhost-user backend (virtiofsd) at a Unix socket.
pub struct VhostUserFs {
    config: [u8; TAG_LEN + 4],
    socket: PathBuf,
    /// The connection to virtiofsd, made at construction (before the VMM's seccomp filter,
    /// which forbids `connect`) and used by the first activation; virtiofsd serves one.
    stream: Option<UnixStream>,
    frontend: Option<Frontend>,
    relay: Option<(EventFd, JoinHandle<()>)>,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("socket", &self.socket)
            .finish()
    }
}

impl VhostUserFs {
    /// A device with mount tag `tag`, connected to its backend listening at `socket`.
    ///
    /// # Errors
    /// A tag longer than 36 bytes or empty; a socket that cannot be connected.
    pub fn new(tag: &str, socket: &Path) -> Result<Self, String> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(format!(
                "virtio-fs tag {tag:?} must be 1 to {TAG_LEN} bytes"
            ));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let stream = connect_until(socket, Instant::now() + SETUP_TIMEOUT)
            .map_err(|e| format!("virtiofsd connect {}: {e}", socket.display()))?;
        Ok(Self {
            config,
            socket: socket.to_owned(),
            stream: Some(stream),
            frontend: None,
            relay: None,
        })
    }

    fn stop_relay(&mut self) {
        if let Some((stop, handle)) = self.relay.take() {
            let _ = stop.write(1);
            let _ = handle.join();
        }
    }

    /// The vhost-user handshake with virtiofsd: memory table, then each queue. It runs on a
    /// thread of its own while the vCPU thread that wrote DRIVER_OK waits at most
    /// [`SETUP_TIMEOUT`]; past it the socket is shut down, which ends the handshake.
    fn setup(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
    ) -> Result<Vec<EventFd>, String> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let stream = self.stream.take().ok_or_else(|| {
            format!(
                "virtio-fs: the connection to virtiofsd at {} was used already (a reset device stays down)",
                self.socket.display()
            )
        })?;
        let guard = stream.try_clone().map_err(|e| e.to_string())?;
        let kicks = kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let rings = queues
            .iter()
            .map(|queue| vring_config(mem, queue).map(|ring| (ring, queue.next_avail())))
            .collect::<Result<Vec<_>, _>>()?;
        let mem = mem.clone();
        let (done, result) = mpsc::channel();
        std::thread::Builder::new()
            .name("virtio-fs-setup".into())
            .spawn(move || {
                let _ = done.send(handshake(stream, &mem, &rings, &kicks));
            })
            .map_err(|e| e.to_string())?;
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(outcome) = result.recv_timeout(left) else {
            let _ = guard.shutdown(Shutdown::Both);
            return Err(format!(
                "virtiofsd: no answer within {} ms",
                SETUP_TIMEOUT.as_millis()
            ));
        };
        let (frontend, calls) = outcome?;
        self.frontend = Some(frontend);
        Ok(calls)
    }
}

fn vhost_error(what: &'static str) -> impl Fn(vhost::Error) -> String {
    move |err| format!("virtiofsd {what}: {err}")
}

/// Everything virtiofsd needs, over `stream`; returns the frontend and each queue's call fd.
fn handshake(
    stream: UnixStream,
    mem: &GuestMemoryMmap,
    rings: &[(VringConfigData, u16)],
    kicks: &[EventFd],
) -> Result<(Frontend, Vec<EventFd>), String> {
    let e = vhost_error;
    let mut frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
    frontend.set_owner().map_err(e("set owner"))?;
    let offered = frontend.get_features().map_err(e("get features"))?;
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    frontend
        .set_features(offered & (VIRTIO_F_VERSION_1 | protocol))
        .map_err(e("set features"))?;
    let with_protocol = offered & protocol != 0;
    if with_protocol {
        let pf = frontend
            .get_protocol_features()
            .map_err(e("get protocol features"))?;
        frontend
            .set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
            .map_err(e("set protocol features"))?;
    }
    frontend
        .set_mem_table(&memory_regions(mem)?)
        .map_err(e("set mem table"))?;
    let mut calls = Vec::new();
    for (i, ((ring, base), kick)) in rings.iter().zip(kicks).enumerate() {
        calls.push(setup_queue(
            &mut frontend,
            i,
            ring,
            *base,
            kick,
            with_protocol,
        )?);
    }
    Ok((frontend, calls))
}

/// Hands queue `i` to virtiofsd, its next available entry at `base` (0 but for a restored
/// device); returns the call fd it signals used buffers on.
fn setup_queue(
    frontend: &mut Frontend,
    i: usize,
    ring: &VringConfigData,
    base: u16,
    kick: &EventFd,
    enable: bool,
) -> Result<EventFd, String> {
    let e = vhost_error;
    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|err| err.to_string())?;
    frontend
        .set_vring_num(i, ring.queue_size)
        .map_err(e("set vring num"))?;
    frontend
        .set_vring_addr(i, ring)
        .map_err(e("set vring addr"))?;
    frontend
        .set_vring_base(i, base)
        .map_err(e("set vring base"))?;
    frontend
        .set_vring_call(i, &call)
        .map_err(e("set vring call"))?;
    frontend
        .set_vring_kick(i, kick)
        .map_err(e("set vring kick"))?;
    if enable {
        frontend
            .set_vring_enable(i, true)
            .map_err(e("enable vring"))?;
    }
    Ok(call)
}

/// Where queue `queue` lives, in this process's addresses.
fn vring_config(mem: &GuestMemoryMmap, queue: &Queue) -> Result<VringConfigData, String> {
    let hva = |gpa: u64| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|err| format!("queue address {gpa:#x}: {err}"))
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: hva(queue.desc_table())?,
        used_ring_addr: hva(queue.used_ring())?,
        avail_ring_addr: hva(queue.avail_ring())?,
        log_addr: None,
    })
}

/// Guest memory as vhost-user regions (it must be file-backed to be shared).
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
    let mut regions = Vec::new();
    for region in mem.iter() {
        let file = region
            .file_offset()
            .ok_or("guest memory is not file-backed (memfd needed)")?;
        regions.push(VhostUserMemoryRegionInfo {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            mmap_offset: file.start(),
            mmap_handle: file.file().as_raw_fd(),
        });
    }
    Ok(regions)
}

/// Connects without blocking past `deadline`: a blocking `connect(2)` on a Unix socket waits
/// for backlog room as long as the listener does not accept.
fn connect_until(path: &Path, deadline: Instant) -> std::io::Result<UnixStream> {
    let addr = UnixAddr::new(path)?;
    loop {
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let fd: OwnedFd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        self.stop_relay();
    }
}

impl VirtioMmioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| self.config.get(start..end))
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
        if self.frontend.is_some() {
            return Err("virtio-fs device already active".into());
        }
        let calls = self.setup(&mem, &queues, &kicks)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let relay_stop = stop.try_clone().map_err(|e| e.to_string())?;
        let handle = std::thread::Builder::new()
            .name("virtio-fs-irq".into())
            .spawn(move || relay_calls(&calls, &relay_stop, &interrupt))
            .map_err(|e| e.to_string())?;
        self.relay = Some((stop, handle));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_relay();
        // Dropping the connection makes virtiofsd forget the queues.
        self.frontend = None;
    }

    /// Stops virtiofsd's rings (`GET_VRING_BASE`, which it answers once its requests are
    /// done, so the next used entry is the next available one). Used while a VM is saved,
    /// before any container exists: nothing is mounted, so virtiofsd has nothing in flight.
    fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
        self.stop_relay();
        let frontend = self
            .frontend
            .as_mut()
            .ok_or("virtio-fs device is not active")?;
        (0..QUEUE_SIZES.len())
            .map(|i| {
                let base = frontend
                    .get_vring_base(i)
                    .map_err(vhost_error("get vring base"))?;
                let at = u16::try_from(base).map_err(|_| format!("vring base {base}"))?;
                Ok(QueuePosition {
                    next_avail: at,
                    next_used: at,
                })
            })
            .collect()
    }
}

/// virtiofsd signals a call fd per queue; the guest learns it through the transport's
/// interrupt status, so each call becomes `signal_used`.
fn relay_calls(calls: &[EventFd], stop: &EventFd, interrupt: &Interrupt) {
    let Ok(epoll) = Epoll::new() else { return };
    for (i, call) in (0u64..).zip(calls) {
        let _ = epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i),
        );
    }
    let _ = epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, EV_STOP),
    );
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Anything else would fail again at once: stop relaying rather than spin.
            Err(_) => return,
        };
        let mut used = false;
        for event in &events[..n] {
            match event.data() {
                EV_STOP => return,
                i => {
                    if let Some(call) = usize::try_from(i).ok().and_then(|i| calls.get(i)) {
                        used |= call.read().is_ok();
                    }
                }
            }
        }
        if used {
            interrupt.signal_used();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::transport::mmio::MmioTransport;

    fn write(t: &mut MmioTransport<VhostUserFs>, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn test_vhost_user_fs_driver_ok_silent_virtiofsd_bounded_needs_reset() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        // Listens but never accepts nor answers: a stalled (or hostile) virtiofsd.
        let _listener = UnixListener::bind(&socket).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fs = VhostUserFs::new("rootfs", &socket).unwrap();
        let mut t = MmioTransport::new(fs, mem, irq).unwrap();
        for (offset, value) in [(0x070, 1), (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 11)] {
            write(&mut t, offset, value);
        }
        let (done, finished) = mpsc::channel();

        let started = Instant::now();
        std::thread::spawn(move || {
            write(&mut t, 0x070, 15); // DRIVER_OK, on this "vCPU" thread
            let mut status = [0u8; 4];
            t.read(0x070, &mut status);
            let _ = done.send(u32::from_le_bytes(status));
        });
        let status = finished
            .recv_timeout(SETUP_TIMEOUT * 5)
            .expect("DRIVER_OK blocked the vCPU thread");

        assert!(
            started.elapsed() >= SETUP_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status, 15 | 64, "DEVICE_NEEDS_RESET");
    }
}
