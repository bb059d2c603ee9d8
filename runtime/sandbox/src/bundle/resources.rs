//! config.json `linux.resources` -> cgroup v2 limits in the guest (config-linux.md), with
//! runc's v1 -> v2 conversions: `memory.limit` -> `memory.max`, `memory.reservation` ->
//! `memory.low`, `cpu.shares` -> `cpu.weight`, `cpu.quota`/`cpu.period` -> `cpu.max`,
//! `cpu.cpus`/`cpu.mems` -> `cpuset.*`, `pids.limit` -> `pids.max`. What cgroup v2 in the
//! guest cannot honour (swap beyond the memory limit: the guest has no swap; kernel memory,
//! swappiness, disabling the OOM killer, realtime, idle, burst, block I/O, hugepages,
//! network, rdma, unified) is an error when set. `devices` is ignored: the VM is the device
//! boundary.

use husk_protocol::{cpu_shares_to_weight, Resources};
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

/// Converts the supported limits; an unsupported one that is set is an error.
pub(super) fn resources(r: &LinuxResources) -> Result<Resources, String> {
    let refused = [
        ("blockIO", r.block_io().is_some()),
        (
            "hugepageLimits",
            r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()),
        ),
        ("network", r.network().is_some()),
        ("rdma", r.rdma().as_ref().is_some_and(|m| !m.is_empty())),
        (
            "unified",
            r.unified().as_ref().is_some_and(|m| !m.is_empty()),
        ),
    ];
    if let Some((field, _)) = refused.into_iter().find(|(_, set)| *set) {
        return Err(format!(
            "linux.resources.{field} is not supported yet; remove it"
        ));
    }
    let mut out = Resources::default();
    if let Some(memory) = r.memory() {
        memory_limits(memory, &mut out)?;
    }
    if let Some(cpu) = r.cpu() {
        cpu_limits(cpu, &mut out)?;
    }
    if let Some(pids) = r.pids() {
        // 0 or negative: no limit (runc writes "max").
        out.pids_max = u64::try_from(pids.limit()).ok().filter(|l| *l > 0);
    }
    Ok(out)
}

/// A byte count where -1 (or any negative) means unlimited and 0 unset.
fn bytes(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0)
}

fn memory_limits(m: &LinuxMemory, out: &mut Resources) -> Result<(), String> {
    out.memory_max = bytes(m.limit());
    out.memory_low = bytes(m.reservation());
    // memory.swap is memory + swap: anything but "same as the limit" or unlimited asks for swap.
    if let Some(swap) = bytes(m.swap()) {
        if Some(swap) != out.memory_max {
            return Err(
                "linux.resources.memory.swap beyond the memory limit is not supported (the guest has no swap)"
                    .into(),
            );
        }
    }
    let refused = [
        ("kernel", bytes(m.kernel()).is_some()),
        ("kernelTCP", bytes(m.kernel_tcp()).is_some()),
        ("swappiness", m.swappiness().is_some()),
        ("disableOOMKiller", m.disable_oom_killer() == Some(true)),
    ];
    match refused.into_iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(format!(
            "linux.resources.memory.{field} is not supported on cgroup v2; remove it"
        )),
        None => Ok(()),
    }
}

fn cpu_limits(c: &LinuxCpu, out: &mut Resources) -> Result<(), String> {
    let refused = [
        (
            "realtimeRuntime",
            c.realtime_runtime().is_some_and(|v| v != 0),
        ),
        (
            "realtimePeriod",
            c.realtime_period().is_some_and(|v| v != 0),
        ),
        ("idle", c.idle().is_some_and(|v| v != 0)),
        ("burst", c.burst().is_some_and(|v| v != 0)),
    ];
    if let Some((field, _)) = refused.into_iter().find(|(_, set)| *set) {
        return Err(format!(
            "linux.resources.cpu.{field} is not supported yet; remove it"
        ));
    }
    out.cpu_weight = c.shares().and_then(cpu_shares_to_weight);
    out.cpu_quota_us = c
        .quota()
        .and_then(|q| u64::try_from(q).ok())
        .filter(|q| *q > 0);
    out.cpu_period_us = c.period().filter(|p| *p > 0);
    let list = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    out.cpuset_cpus = list(c.cpus());
    out.cpuset_mems = list(c.mems());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(json: &str) -> Result<Resources, String> {
        resources(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn test_resources_converted_as_runc() {
        let r = from_json(
            r#"{"memory":{"limit":33554432,"reservation":-1,"swap":33554432},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                "pids":{"limit":10},
                "devices":[{"allow":false,"access":"rwm"}]}"#,
        )
        .unwrap();
        assert_eq!(r.memory_max, Some(33_554_432));
        assert_eq!(r.memory_low, None);
        assert_eq!(r.cpu_weight, Some(39));
        assert_eq!(r.cpu_max().as_deref(), Some("50000 100000"));
        assert_eq!(r.cpuset_cpus.as_deref(), Some("0"));
        assert_eq!(r.pids_max, Some(10));
    }

    #[test]
    fn test_resources_swap_and_block_io_rejected() {
        let err = from_json(r#"{"memory":{"limit":1000000,"swap":2000000}}"#).unwrap_err();
        assert!(err.contains("no swap"), "{err}");
        let err = from_json(r#"{"blockIO":{"weight":10}}"#).unwrap_err();
        assert!(err.contains("blockIO"), "{err}");
    }
}
