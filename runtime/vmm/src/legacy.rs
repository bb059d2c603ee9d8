//! Legacy port-IO devices: 8250 serial (console), i8042 (reset), debug exit; and the
//! [`ExitSignal`] through which any of them (or a vCPU) ends the VM.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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
    serial: Serial<IrqTrigger, NoEvents, W>,
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

    /// A serial port as `state` left one (the guest's driver configured it and enabled its
    /// interrupts), raising `irq` and writing to `out`.
    ///
    /// # Errors
    /// The saved receive buffer is longer than the FIFO.
    pub fn restore(irq: EventFd, out: W, state: &SerialSnapshot) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { serial })
    }

    /// The registers, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// The 8250's registers in a snapshot (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
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
