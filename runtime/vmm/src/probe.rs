//! The KVM capability probe: can this host's KVM run a full Linux guest?
//!
//! Some hosts expose a KVM that runs tiny guests but not Linux (a restricted nested KVM such as
//! PVM: emulation failures on cmpxchg16b, xrstor, int3). The probe runs a tiny 64-bit guest
//! (payloads/probe.S) that exercises exactly those, in a few milliseconds.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{CpuMode, Entry, ExitReason, Vm, VmConfig};

const PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.bin"));
const PROBE_ADDR: u64 = 0x1_0000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Whether KVM can run a full guest here.
    pub passed: bool,
    /// One line: what passed, or what failed and how.
    pub detail: String,
    /// How long the probe took.
    pub elapsed: Duration,
}

#[derive(Clone, Default)]
struct Stages(Arc<Mutex<Vec<u8>>>);

impl Write for Stages {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn stage_name(stage: Option<u8>) -> &'static str {
    match stage {
        Some(b'1') => "cmpxchg16b",
        Some(b'2') => "xsave/xrstor",
        Some(b'3') => "int3 delivery",
        _ => "64-bit entry",
    }
}

/// Runs the probe. Never fails: a missing /dev/kvm is a failed probe with that reason.
pub fn probe() -> ProbeReport {
    let start = Instant::now();
    let stages = Stages::default();
    let config = VmConfig {
        memory_mib: 4,
        irqchip: false,
        console: Box::new(stages.clone()),
        virtio: Vec::new(),
        entry: Entry::Payload {
            code: PROBE.to_vec(),
            addr: PROBE_ADDR,
            mode: CpuMode::Long,
        },
    };
    let result = Vm::new(config).and_then(|vm| vm.run(PROBE_TIMEOUT));
    let last = stages
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .last()
        .copied();
    let stage = stage_name(last);
    let (passed, detail) = match result {
        Ok(ExitReason::DebugExit(b'O')) => (
            true,
            "64-bit entry, cmpxchg16b, xsave/xrstor and int3 delivery work".to_owned(),
        ),
        Ok(ExitReason::DebugExit(b'F')) => (false, format!("{stage} gave a wrong result")),
        Ok(ExitReason::InternalError) => (
            false,
            format!("KVM cannot emulate {stage} (internal error)"),
        ),
        Ok(other) => (false, format!("{stage} ended the guest: {other:?}")),
        Err(e) => (false, e.to_string()),
    };
    ProbeReport {
        passed,
        detail,
        elapsed: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_probe_payload_assembled_nonempty() {
        assert!(
            super::PROBE.len() > 4096,
            "probe.bin holds code and its xsave area"
        );
    }
}
