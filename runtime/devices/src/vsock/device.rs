//! The vsock device: moves packets between the virtqueues and a [`VsockBackend`].
//!
//! Transport-independent: a transport owns the queues and guest memory, calls
//! [`Vsock::process_queues`] on every queue kick and every backend event, and signals the guest
//! for the queues it reports as used (checking `needs_notification` for EVENT_IDX). The event
//! queue (virtio 1.2 §5.10.6.6, transport reset after migration) is not used by this device.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemory, Le64};
use vmm_sys_util::epoll::EventSet;

use super::metrics::METRICS;
use super::packet::{parse_rx, parse_tx, rx_used_len};
use super::{RxOutcome, TxOutcome, VsockBackend};
use crate::rate_limited::warn_rate_limited;

/// How often TX and RX are re-run in one call when TX waits for RX room.
const MAX_PASSES: usize = 8;

/// Device configuration space, `struct virtio_vsock_config` (virtio 1.2 §5.10.4).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VirtioVsockConfig {
    /// The guest's CID, little-endian.
    pub(crate) guest_cid: Le64,
}

// SAFETY: `VirtioVsockConfig` is `repr(C)` with a single `Le64` field: no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for VirtioVsockConfig {}

impl VirtioVsockConfig {
    /// `size` bytes of the config space from `offset`; empty if out of range.
    pub(crate) fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (Ok(start), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        start
            .checked_add(size)
            .and_then(|end| self.as_slice().get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

/// Which queues got used buffers in one [`Vsock::process_queues`] call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueActivity {
    /// The RX used ring changed.
    pub(crate) rx_used: bool,
    /// The TX used ring changed.
    pub(crate) tx_used: bool,
}

/// Why an RX drain stopped.
enum RxStop {
    /// The backend has nothing more to send.
    BackendIdle,
    /// No more buffers from the guest.
    QueueEmpty,
    /// The backend declined the buffer it was offered.
    NoData,
}

/// A virtio-vsock device over a backend `B`.
#[derive(Debug)]
pub(crate) struct Vsock<B> {
    guest_cid: u64,
    backend: B,
    /// TX stopped because the backend was busy; rerun it after RX progress.
    tx_stalled: bool,
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for the guest with CID `guest_cid`.
    pub(crate) fn new(guest_cid: u64, backend: B) -> Self {
        Self {
            guest_cid,
            backend,
            tx_stalled: false,
        }
    }

    /// The configuration space the driver reads.
    pub(crate) fn config(&self) -> VirtioVsockConfig {
        VirtioVsockConfig {
            guest_cid: Le64::from(self.guest_cid),
        }
    }

    /// The backend (for its pollable fd).
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// Forwards events on the backend fd.
    pub(crate) fn notify_backend(&mut self, evset: EventSet) {
        self.backend.notify(evset);
    }

    /// Device reset: every connection is dropped.
    pub(crate) fn reset(&mut self) {
        self.backend.reset();
        self.tx_stalled = false;
    }

    /// Consumes TX, fills RX, and repeats while TX waits for RX room and RX made progress.
    pub(crate) fn process_queues<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
    ) -> QueueActivity {
        let mut activity = QueueActivity::default();
        for _ in 0..MAX_PASSES {
            activity.tx_used |= self.process_tx(mem, txq);
            let rx_used = self.process_rx(mem, rxq);
            activity.rx_used |= rx_used;
            if !(self.tx_stalled && rx_used) {
                break;
            }
        }
        activity
    }

    /// Drains the TX queue into the backend; returns whether buffers were used.
    fn process_tx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                queue_error("tx disable notification", &e);
                return used;
            }
            while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                if self.handle_tx_chain(mem, &mut chain) == TxOutcome::Busy {
                    queue.go_to_previous_position();
                    self.tx_stalled = true;
                    return used;
                }
                add_used(queue, mem, head, 0);
                used = true;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return used,
                Err(e) => {
                    queue_error("tx enable notification", &e);
                    return used;
                }
            }
        }
    }

    fn handle_tx_chain<'a, M: GuestMemory>(
        &mut self,
        mem: &'a M,
        chain: &mut DescriptorChain<&'a M>,
    ) -> TxOutcome {
        let pkt = match parse_tx(mem, chain) {
            Ok(pkt) => pkt,
            Err(e) => {
                METRICS.tx_bad_desc.inc();
                warn_rate_limited!(error = %e, "vsock: dropping malformed tx descriptor chain");
                return TxOutcome::Consumed;
            }
        };
        if pkt.src_cid() != self.guest_cid {
            METRICS.tx_bad_src_cid.inc();
            warn_rate_limited!(
                src_cid = pkt.src_cid(),
                "vsock: dropping packet with foreign cid"
            );
            return TxOutcome::Consumed;
        }
        let outcome = self.backend.send_pkt(&pkt);
        if outcome == TxOutcome::Consumed {
            METRICS.tx_packets.inc();
            METRICS.tx_bytes.add(u64::from(pkt.len()));
        }
        outcome
    }

    /// Fills RX buffers from the backend; returns whether buffers were used.
    fn process_rx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                queue_error("rx disable notification", &e);
                return used;
            }
            let stop = self.drain_rx(mem, queue, &mut used);
            // Re-enable kicks in every case: a backend with more to send needs the next buffer.
            match (queue.enable_notification(mem), stop) {
                (Ok(true), RxStop::QueueEmpty) => continue,
                (Err(e), _) => queue_error("rx enable notification", &e),
                _ => {}
            }
            return used;
        }
    }

    fn drain_rx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue, used: &mut bool) -> RxStop {
        loop {
            if !self.backend.has_pending_rx() {
                return RxStop::BackendIdle;
            }
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                return RxStop::QueueEmpty;
            };
            let head = chain.head_index();
            let Some(len) = self.fill_rx_chain(mem, &mut chain) else {
                queue.go_to_previous_position();
                return RxStop::NoData;
            };
            add_used(queue, mem, head, len);
            *used = true;
        }
    }

    /// Returns the used length, or `None` if the backend had nothing after all.
    fn fill_rx_chain<'a, M: GuestMemory>(
        &mut self,
        mem: &'a M,
        chain: &mut DescriptorChain<&'a M>,
    ) -> Option<u32> {
        let mut pkt = match parse_rx(mem, chain) {
            Ok(pkt) => pkt,
            Err(e) => {
                METRICS.rx_bad_desc.inc();
                warn_rate_limited!(error = %e, "vsock: dropping malformed rx descriptor chain");
                return Some(0);
            }
        };
        match self.backend.recv_pkt(&mut pkt) {
            RxOutcome::Filled => {
                METRICS.rx_packets.inc();
                Some(rx_used_len(&pkt))
            }
            RxOutcome::NoData => None,
        }
    }
}

fn add_used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        queue_error("add used", &e);
    }
}

fn queue_error(op: &'static str, error: &virtio_queue::Error) {
    METRICS.queue_errors.inc();
    warn_rate_limited!(op, error = %error, "vsock: virtqueue operation failed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::defs::uapi::*;
    use crate::vsock::test_utils::{Hdr, TestContext, DESC_F_WRITE as WRITE, GUEST_CID};

    #[test]
    fn test_vsock_config_reads_guest_cid_le() {
        let ctx = TestContext::new();
        let dev = ctx.device();

        let config = dev.config();

        assert_eq!(config.read(0, 8), GUEST_CID.to_le_bytes().to_vec());
        assert_eq!(config.read(4, 4), vec![0, 0, 0, 0]);
        assert!(config.read(4, 8).is_empty());
        assert!(config.read(u32::MAX, 2).is_empty());
    }

    #[test]
    fn test_process_tx_malformed_chains_dropped_device_keeps_running() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        let bad_before = METRICS.tx_bad_desc.count();
        ctx.push_tx_raw(&[(0x80_0000, 44, WRITE)]); // write-only header
        ctx.push_tx_raw(&[(0x80_0000, 10, 0)]); // header too short
        ctx.push_tx_raw(&[(0xFFFF_FFFF_0000, 44, 0)]); // outside guest memory
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.push_rx_buffers(4);

        let activity = ctx.process(&mut dev);

        assert!(activity.tx_used);
        let used = ctx.take_used_tx();
        assert_eq!(used.len(), 4);
        assert!(used.iter().all(|elem| elem.len() == 0));
        assert!(METRICS.tx_bad_desc.count() >= bad_before + 3);
        let rx = ctx.take_rx();
        assert_eq!(rx.len(), 1, "the valid orphan packet still gets its rst");
        assert_eq!(rx[0].hdr.op, VSOCK_OP_RST);
    }

    #[test]
    fn test_process_tx_foreign_src_cid_dropped_without_reply() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        let mut hdr = Hdr::guest(VSOCK_OP_REQUEST, 5000, 1234);
        hdr.src_cid = GUEST_CID + 1;
        ctx.push_tx(hdr, &[]);
        ctx.push_rx_buffers(1);

        ctx.process(&mut dev);

        assert_eq!(ctx.take_used_tx().len(), 1);
        assert!(ctx.take_rx().is_empty());
    }

    #[test]
    fn test_process_rx_malformed_buffer_returned_empty() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        let bad_before = METRICS.rx_bad_desc.count();
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.push_rx_raw(&[(0x10_0000, 4096, 0)]); // read-only rx buffer
        ctx.push_rx_buffers(1);

        ctx.process(&mut dev);

        let rx = ctx.take_rx();
        assert_eq!(rx.len(), 2);
        assert_eq!(rx[0].used_len, 0);
        assert_eq!(rx[1].hdr.op, VSOCK_OP_RST);
        assert!(METRICS.rx_bad_desc.count() > bad_before);
    }

    #[test]
    fn test_process_queues_rx_full_pauses_tx_without_losing_rsts() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        for port in 0..300 {
            ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 10_000 + port, 1234), &[]);
        }

        ctx.process(&mut dev);
        let consumed_without_rx = ctx.take_used_tx().len();
        ctx.push_rx_buffers(300);
        ctx.process(&mut dev);
        ctx.process(&mut dev);

        assert!(
            consumed_without_rx < 300,
            "tx must pause while rsts cannot be delivered"
        );
        assert_eq!(consumed_without_rx + ctx.take_used_tx().len(), 300);
        let rsts = ctx.take_rx();
        assert_eq!(rsts.len(), 300);
        assert!(rsts
            .iter()
            .all(|p| p.hdr.op == VSOCK_OP_RST && p.hdr.dst_cid == GUEST_CID));
    }

    #[test]
    fn test_process_rx_no_buffers_keeps_packets_for_later() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);

        let activity = ctx.process(&mut dev);
        ctx.push_rx_buffers(1);
        ctx.process(&mut dev);

        assert!(!activity.rx_used);
        assert_eq!(ctx.take_rx().len(), 1);
    }
}
