//! The vsock device: moves packets between the virtqueues and a [`VsockBackend`].
//!
//! Transport-independent: a transport owns the queues and guest memory, calls
//! [`Vsock::process_queues`] on every queue kick and every backend event, and signals the guest
//! for the queues it reports as used (checking `needs_notification` for EVENT_IDX). The event
//! queue carries one event only: the transport reset a restored device sends
//! ([`send_transport_reset`], virtio 1.2 §5.10.6.6).

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::EventSet;

use super::defs::MAX_QUEUE_SIZE;
use super::metrics::METRICS;
use super::packet::{parse_rx, parse_tx, rx_used_len};
use super::{RxOutcome, TxOutcome, VsockBackend};
use crate::queue::{log_broken, pop, QueueFault};
use crate::rate_limited::warn_rate_limited;

/// How often TX and RX are re-run in one call when TX waits for RX room.
const MAX_PASSES: usize = 8;
/// Chains one [`Vsock::process_queues`] call handles at most (two full rings of the largest
/// size): a guest that keeps posting cannot keep the worker from its other events.
pub(crate) const MAX_CHAINS_PER_CALL: usize = 2 * MAX_QUEUE_SIZE as usize;

/// What one [`Vsock::process_queues`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueActivity {
    /// The RX used ring changed.
    pub(crate) rx_used: bool,
    /// The TX used ring changed.
    pub(crate) tx_used: bool,
    /// A queue was found corrupted in this call: the transport reports `DEVICE_NEEDS_RESET`.
    pub(crate) broke: bool,
    /// The call stopped at its budget with work left: the transport calls again soon (after
    /// checking its own events), since the guest will not notify for work it already posted.
    pub(crate) more: bool,
}

/// Why an RX drain stopped.
enum RxStop {
    /// The backend has nothing more to send.
    BackendIdle,
    /// No more buffers from the guest.
    QueueEmpty,
    /// The backend declined the buffer it was offered.
    NoData,
    /// The call's budget is spent.
    Budget,
}

/// Which queue a fault was found on.
type Faulted = (&'static str, QueueFault);

/// A virtio-vsock device over a backend `B`.
#[derive(Debug)]
pub(crate) struct Vsock<B> {
    guest_cid: u64,
    backend: B,
    /// TX stopped because the backend was busy; rerun it after RX progress.
    tx_stalled: bool,
    /// A queue was corrupted: nothing is processed until the driver resets the device.
    broken: bool,
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for the guest with CID `guest_cid`.
    pub(crate) fn new(guest_cid: u64, backend: B) -> Self {
        Self {
            guest_cid,
            backend,
            tx_stalled: false,
            broken: false,
        }
    }

    /// The backend (for its pollable fd).
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// Forwards events on the backend fd (also while broken: the backend must drain them).
    pub(crate) fn notify_backend(&mut self, evset: EventSet) {
        self.backend.notify(evset);
    }

    /// Device reset: every connection is dropped, a broken device serves again.
    pub(crate) fn reset(&mut self) {
        self.backend.reset();
        self.tx_stalled = false;
        self.broken = false;
    }

    /// Consumes TX, fills RX, and repeats while TX waits for RX room and RX made progress; at
    /// most [`MAX_CHAINS_PER_CALL`] chains in all. Nothing once a queue was found corrupted.
    pub(crate) fn process_queues<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
    ) -> QueueActivity {
        let mut activity = QueueActivity::default();
        if self.broken {
            return activity;
        }
        let mut budget = MAX_CHAINS_PER_CALL;
        if let Err((queue, fault)) = self.run_passes(mem, rxq, txq, &mut budget, &mut activity) {
            self.mark_broken(queue, &fault);
            activity.broke = true;
        }
        activity.more = budget == 0 && !self.broken;
        activity
    }

    fn run_passes<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
        budget: &mut usize,
        activity: &mut QueueActivity,
    ) -> Result<(), Faulted> {
        for _ in 0..MAX_PASSES {
            activity.tx_used |= self.process_tx(mem, txq, budget).map_err(|f| ("tx", f))?;
            let rx_used = self.process_rx(mem, rxq, budget).map_err(|f| ("rx", f))?;
            activity.rx_used |= rx_used;
            if !(self.tx_stalled && rx_used) || *budget == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Stops the device: counted, logged once, every host stream closed (their clients see
    /// EOF instead of waiting on a guest that can no longer answer).
    fn mark_broken(&mut self, queue: &'static str, fault: &QueueFault) {
        self.broken = true;
        METRICS.queues_broken.inc();
        log_broken("vsock", queue, fault);
        self.backend.reset();
    }

    /// Drains the TX queue into the backend; returns whether buffers were used.
    fn process_tx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        budget: &mut usize,
    ) -> Result<bool, QueueFault> {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            queue.disable_notification(mem).map_err(QueueFault::Ring)?;
            while *budget > 0 {
                let Some(mut chain) = pop(queue, mem)? else {
                    break;
                };
                *budget -= 1;
                let head = chain.head_index();
                if self.handle_tx_chain(mem, &mut chain) == TxOutcome::Busy {
                    queue.go_to_previous_position();
                    self.tx_stalled = true;
                    return Ok(used);
                }
                queue.add_used(mem, head, 0).map_err(QueueFault::Ring)?;
                used = true;
            }
            if *budget == 0 || !queue.enable_notification(mem).map_err(QueueFault::Ring)? {
                return Ok(used);
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
    fn process_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        budget: &mut usize,
    ) -> Result<bool, QueueFault> {
        let mut used = false;
        loop {
            queue.disable_notification(mem).map_err(QueueFault::Ring)?;
            let stop = self.drain_rx(mem, queue, &mut used, budget)?;
            // Re-enable kicks in every case: a backend with more to send needs the next buffer.
            let more = queue.enable_notification(mem).map_err(QueueFault::Ring)?;
            if !(more && matches!(stop, RxStop::QueueEmpty)) {
                return Ok(used);
            }
        }
    }

    fn drain_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        used: &mut bool,
        budget: &mut usize,
    ) -> Result<RxStop, QueueFault> {
        loop {
            if !self.backend.has_pending_rx() {
                return Ok(RxStop::BackendIdle);
            }
            if *budget == 0 {
                return Ok(RxStop::Budget);
            }
            let Some(mut chain) = pop(queue, mem)? else {
                return Ok(RxStop::QueueEmpty);
            };
            *budget -= 1;
            let head = chain.head_index();
            let Some(len) = self.fill_rx_chain(mem, &mut chain) else {
                queue.go_to_previous_position();
                return Ok(RxStop::NoData);
            };
            queue.add_used(mem, head, len).map_err(QueueFault::Ring)?;
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

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 §5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Tells the driver that every connection is gone (a VM restored from a snapshot: its peers
/// on the host are not those of the saved VM): a `struct virtio_vsock_event` with the
/// transport reset id in the driver's next event buffer. The driver then drops its
/// connections, keeps its listening sockets and re-reads the CID. Returns whether a buffer
/// was there to take it (a driver always posts event buffers once it is ready).
///
/// # Errors
/// A [`QueueFault`] of the event queue.
pub(crate) fn send_transport_reset<M: GuestMemory>(
    mem: &M,
    evq: &mut Queue,
) -> Result<bool, QueueFault> {
    let Some(chain) = pop(evq, mem)? else {
        return Ok(false);
    };
    let head = chain.head_index();
    let event = EVENT_TRANSPORT_RESET.to_le_bytes();
    let written = chain
        .clone()
        .find(|d| d.is_write_only() && d.len() >= 4)
        .and_then(|d| mem.write_slice(&event, d.addr()).ok())
        .map_or(0, |()| 4);
    evq.add_used(mem, head, written).map_err(QueueFault::Ring)?;
    Ok(written == 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limited::count_events;
    use crate::vsock::defs::uapi::*;
    use crate::vsock::test_utils::{
        Hdr, TestContext, DESC_F_WRITE as WRITE, GUEST_CID, QUEUE_SIZE, SCRATCH_BASE,
    };
    use crate::vsock::unix::VsockUnixBackend;

    /// `VIRTQ_DESC_F_INDIRECT`.
    const INDIRECT: u16 = 4;

    /// Runs the device on a corrupted queue: it must break in the first call (counted, at
    /// most one log line) and then do nothing at all, promptly, however often it is called.
    fn assert_breaks(ctx: &mut TestContext, dev: &mut Vsock<VsockUnixBackend>) {
        let broken_before = METRICS.queues_broken.count();

        let mut first = QueueActivity::default();
        let lines = count_events(|| first = ctx.process(dev));
        let later = count_events(|| {
            for _ in 0..1000 {
                assert_eq!(ctx.pump(dev), QueueActivity::default());
            }
        });

        assert!(first.broke, "{first:?}");
        assert!(!first.more);
        assert!(METRICS.queues_broken.count() > broken_before);
        assert!(lines <= 1, "{lines} log lines for one broken queue");
        assert_eq!(later, 0, "a broken device stays silent");
    }

    #[test]
    fn test_process_tx_malformed_chains_dropped_device_keeps_running() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        let bad_before = METRICS.tx_bad_desc.count();
        ctx.push_tx_raw(&[(0x80_0000, 44, WRITE)]); // write-only header
        ctx.push_tx_raw(&[(0x80_0000, 10, 0)]); // header too short
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.push_rx_buffers(4);

        let activity = ctx.process(&mut dev);

        assert!(activity.tx_used);
        let used = ctx.take_used_tx();
        assert_eq!(used.len(), 3);
        assert!(used.iter().all(|elem| elem.len() == 0));
        assert!(METRICS.tx_bad_desc.count() >= bad_before + 2);
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

    #[test]
    fn test_process_tx_avail_idx_past_queue_size_breaks_device() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.corrupt_tx_avail_idx(QUEUE_SIZE + 1);

        assert_breaks(&mut ctx, &mut dev);
        assert!(ctx.take_used_tx().is_empty());
    }

    #[test]
    fn test_process_rx_avail_idx_past_queue_size_breaks_device() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        // An orphan packet: the backend then has an rst to deliver on RX.
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.push_rx_buffers(1);
        ctx.corrupt_rx_avail_idx(QUEUE_SIZE);

        assert_breaks(&mut ctx, &mut dev);
        assert!(ctx.take_rx().is_empty());
    }

    #[test]
    fn test_process_tx_indirect_descriptor_not_offered_breaks_device() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        // A well-formed indirect table holding a valid packet header: never followed.
        ctx.push_tx_hdr_raw(
            Hdr::guest(VSOCK_OP_REQUEST, 5000, 1234),
            &[(SCRATCH_BASE, 16, INDIRECT)],
        );

        assert_breaks(&mut ctx, &mut dev);
    }

    #[test]
    fn test_process_tx_buffer_outside_memory_breaks_device() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        ctx.push_tx_raw(&[(0xFFFF_FFFF_0000, 44, 0)]);

        assert_breaks(&mut ctx, &mut dev);
    }

    #[test]
    fn test_process_rx_looping_chain_breaks_device() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        ctx.push_tx(Hdr::guest(VSOCK_OP_RW, 5000, 1234), &[]);
        ctx.push_rx_loop();

        assert_breaks(&mut ctx, &mut dev);
    }

    #[test]
    fn test_vsock_reset_after_broken_device_serves_again() {
        let mut ctx = TestContext::new();
        let mut dev = ctx.device();
        ctx.corrupt_tx_avail_idx(QUEUE_SIZE + 1);
        assert!(ctx.process(&mut dev).broke);
        ctx.corrupt_tx_avail_idx(0);

        dev.reset();
        ctx.push_tx(Hdr::guest(VSOCK_OP_REQUEST, 5000, 1234), &[]);
        ctx.push_rx_buffers(1);
        let activity = ctx.process(&mut dev);

        assert!(activity.tx_used && activity.rx_used, "{activity:?}");
        assert_eq!(ctx.take_rx().len(), 1, "the refused request gets its rst");
    }

    #[test]
    fn test_transport_reset_event_fills_next_event_buffer_once() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{GuestAddress, GuestMemoryMmap};
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let mut queue: Queue = evq.create_queue().unwrap();
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x8000)).unwrap();
        let descs = [SplitDescriptor::new(0x8000, 8, WRITE, 0)];
        evq.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();

        assert!(send_transport_reset(&mem, &mut queue).unwrap());
        assert!(
            !send_transport_reset(&mem, &mut queue).unwrap(),
            "no second buffer"
        );

        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x8000)).unwrap(), 0);
        assert_eq!(evq.used().idx().load(), 1);
    }
}
