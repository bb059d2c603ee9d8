//! virtio-fs for the built-in VMM: the device is virtiofsd (the same one the QEMU door uses),
//! reached over vhost-user; this is the frontend that hands it the guest memory and the queues,
//! and relays its "used buffers" signals to the guest through the virtio-mmio transport.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::transport::mmio::{Interrupt, VirtioMmioDevice};

const VIRTIO_ID_FS: u32 = 26;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// One high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
/// Longest tag in the config space (virtio 1.2 §5.11.4).
const TAG_LEN: usize = 36;
const EV_STOP: u64 = u64::MAX;

/// A virtio-fs device served by a vhost-user backend (virtiofsd) at a Unix socket.
pub struct VhostUserFs {
    config: [u8; TAG_LEN + 4],
    socket: PathBuf,
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
    /// A device with mount tag `tag`, its backend listening at `socket`.
    ///
    /// # Errors
    /// A tag longer than 36 bytes or empty.
    pub fn new(tag: &str, socket: &Path) -> Result<Self, String> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(format!(
                "virtio-fs tag {tag:?} must be 1 to {TAG_LEN} bytes"
            ));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            config,
            socket: socket.to_owned(),
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

    fn setup(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
    ) -> Result<Vec<EventFd>, String> {
        fn e(what: &'static str) -> impl Fn(vhost::Error) -> String {
            move |err| format!("virtiofsd {what}: {err}")
        }
        let mut frontend =
            Frontend::connect(&self.socket, QUEUE_SIZES.len() as u64).map_err(e("connect"))?;
        frontend.set_owner().map_err(e("set owner"))?;
        let offered = frontend.get_features().map_err(e("get features"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        frontend
            .set_features(offered & (VIRTIO_F_VERSION_1 | protocol))
            .map_err(e("set features"))?;
        if offered & protocol != 0 {
            let pf = frontend
                .get_protocol_features()
                .map_err(e("get protocol features"))?;
            frontend
                .set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
                .map_err(e("set protocol features"))?;
        }
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
        frontend
            .set_mem_table(&regions)
            .map_err(e("set mem table"))?;
        let hva = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|err| format!("queue address {gpa:#x}: {err}"))
        };
        let mut calls = Vec::new();
        for (i, (queue, kick)) in queues.iter().zip(kicks).enumerate() {
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: hva(queue.desc_table())?,
                used_ring_addr: hva(queue.used_ring())?,
                avail_ring_addr: hva(queue.avail_ring())?,
                log_addr: None,
            };
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|err| err.to_string())?;
            frontend
                .set_vring_num(i, queue.size())
                .map_err(e("set vring num"))?;
            frontend
                .set_vring_addr(i, &ring)
                .map_err(e("set vring addr"))?;
            frontend.set_vring_base(i, 0).map_err(e("set vring base"))?;
            frontend
                .set_vring_call(i, &call)
                .map_err(e("set vring call"))?;
            frontend
                .set_vring_kick(i, kick)
                .map_err(e("set vring kick"))?;
            if offered & protocol != 0 {
                frontend
                    .set_vring_enable(i, true)
                    .map_err(e("enable vring"))?;
            }
            calls.push(call);
        }
        self.frontend = Some(frontend);
        Ok(calls)
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
        let Ok(n) = epoll.wait(-1, &mut events) else {
            continue;
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
