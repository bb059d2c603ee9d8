//! Legacy port-IO devices: 8250 serial (console), i8042 (reset), debug exit; and the
//! [`ExitSignal`] through which any of them (or a vCPU) ends the VM.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::vm::ExitReason;

/// Ends the VM once: the first reason is kept, the event fd wakes whoever waits for the end.
#[derive(Debug, Clone)]
pub struct ExitSignal {
    evt: Arc<EventFd>,
    reason: Arc<(Mutex<Option<ExitReason>>, Condvar)>,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            reason: Arc::default(),
        })
    }

    /// Records `reason` (unless the VM already ended) and wakes the waiters.
    pub fn exit(&self, reason: ExitReason) {
        let (slot, cond) = &*self.reason;
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        cond.notify_all();
        let _ = self.evt.write(1);
    }

    /// Why the VM ended, if it did.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for the VM to end; returns why it did, if it did.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let (slot, cond) = &*self.reason;
        let slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let (slot, _) = cond
            .wait_timeout_while(slot, timeout, |reason| reason.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        slot.clone()
    }

    /// The fd that becomes readable when the VM ends.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

/// An interrupt line: an event fd (an irqfd once registered with KVM).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1, its output going to `W` (the console log).
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A serial port raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Output errors (a full disk) must not stop the guest; the console is best effort.
            let _ = self.serial.write(offset, *byte);
        }
    }
}

/// Ends the VM with [`ExitReason::Reset`] when the i8042 is asked to reset the CPU.
#[derive(Debug)]
pub struct ResetTrigger(pub ExitSignal);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.exit(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller: only its CPU-reset command matters.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.0.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            let _ = self.0.write(offset, *byte);
        }
    }
}

/// A byte written here ends the VM with [`ExitReason::DebugExit`] of that byte.
#[derive(Debug)]
pub struct DebugExit(pub ExitSignal);

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.0.exit(ExitReason::DebugExit(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_signal_first_reason_kept() {
        let exit = ExitSignal::new().unwrap();
        exit.exit(ExitReason::DebugExit(3));
        exit.exit(ExitReason::Reset);
        assert_eq!(exit.reason(), Some(ExitReason::DebugExit(3)));
        assert_eq!(exit.event().read().unwrap(), 2);
    }

    #[test]
    fn test_i8042_reset_command_ends_vm() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn test_serial_wide_access_ignored() {
        let out = Vec::new();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), out);
        dev.write(0, b"ab");
        dev.write(0, b"c");
        let mut data = [0u8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(dev.serial.writer(), b"c");
    }
}
