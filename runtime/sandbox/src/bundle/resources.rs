//! config.json `linux.resources` -> cgroup v2 limits in the guest (config-linux.md), with
//! runc's v1 -> v2 conversions: `memory.limit` -> `memory.max`, `memory.reservation` ->
//! `memory.low`, `cpu.shares` -> `cpu.weight`, `cpu.quota`/`cpu.period` -> `cpu.max`,
//! `cpu.cpus`/`cpu.mems` -> `cpuset.*`, `pids.limit` -> `pids.max`, `blockIO.weight` ->
//! `io.weight`, `cpu.idle` -> `cpu.idle`, `cpu.burst` -> `cpu.max.burst`, and `unified` as
//! raw v2 files.
//!
//! A field that only tunes resources never refuses a container: what the guest cannot honour
//! is ignored with one debug line naming it (engines send some of these by default: Docker
//! and Podman set `memory.swap` to twice the limit). Ignored: swap beyond the memory limit
//! (the guest has no swap), `memory.kernel`/`kernelTCP` (cgroup v2 counts kernel memory in
//! `memory.max`; runc ignores them too), `memory.swappiness` (no v2 file; runc ignores it on
//! v2), `disableOOMKiller` (no v2 equivalent), realtime runtime/period (no realtime group
//! scheduling in cgroup v2), `blockIO.leafWeight` (v1 only), the per-device `blockIO`
//! weights and throttles (they name host device numbers, which mean nothing in the guest),
//! `hugepageLimits` (the guest has no huge pages), `network` (net_cls/net_prio are v1 only)
//! and `rdma` (the guest has no RDMA device). `devices` is ignored: the VM is the device
//! boundary. Refused, with one line naming the field: values no runtime could apply (a
//! weight out of range, swap below the memory limit, an idle flag other than 0 or 1, a burst
//! above the quota, a `unified` key that is not a v2 file of the container's own cgroup).

use husk_protocol::{blkio_weight_to_io_weight, cpu_shares_to_weight, Resources};
use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxResources};

/// Converts the limits the guest can honour, ignores the others (a debug line each) and
/// checks the result.
///
/// # Errors
/// A one-line reason naming the field, for a value no runtime could apply.
pub(super) fn resources(r: &LinuxResources) -> Result<Resources, String> {
    ignore_unhonoured(r);
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
    if let Some(block_io) = r.block_io() {
        out.io_weight = block_io_weight(block_io)?;
    }
    out.unified = r
        .unified()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.validate()
        .map_err(|e| format!("linux.resources: {e}"))?;
    Ok(out)
}

/// Logs, one debug line each, the set fields of `r` the guest cannot honour.
fn ignore_unhonoured(r: &LinuxResources) {
    let set = [
        (
            "hugepageLimits",
            r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()),
            "the guest has no huge pages",
        ),
        (
            "network",
            r.network().is_some(),
            "net_cls and net_prio exist only on cgroup v1",
        ),
        (
            "rdma",
            r.rdma().as_ref().is_some_and(|m| !m.is_empty()),
            "the guest has no RDMA device",
        ),
    ];
    ignore(&set);
}

/// One debug line for each `(field, set, reason)` that is set.
fn ignore(fields: &[(&str, bool, &str)]) {
    for (field, _, reason) in fields.iter().filter(|(_, set, _)| *set) {
        tracing::debug!(
            field = %format_args!("linux.resources.{field}"),
            reason,
            "resource field ignored"
        );
    }
}

/// Whether a per-device list is set and not empty.
fn per_device<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_empty())
}

/// A byte count where -1 (or any negative) means unlimited and 0 unset.
fn bytes(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0)
}

fn memory_limits(m: &LinuxMemory, out: &mut Resources) -> Result<(), String> {
    out.memory_max = bytes(m.limit());
    out.memory_low = bytes(m.reservation());
    // memory.swap is memory + swap: below the limit it is no valid value (runc refuses it
    // too); above it, it allows swap, which the guest does not have.
    let swap = bytes(m.swap());
    if let (Some(swap), Some(limit)) = (swap, out.memory_max) {
        if swap < limit {
            return Err(format!(
                "linux.resources.memory.swap {swap} is below memory.limit {limit} (it counts memory + swap)"
            ));
        }
    }
    ignore(&[
        (
            "memory.swap",
            swap.is_some_and(|s| Some(s) != out.memory_max),
            "the guest has no swap",
        ),
        (
            "memory.kernel",
            bytes(m.kernel()).is_some(),
            "cgroup v2 counts kernel memory in memory.max",
        ),
        (
            "memory.kernelTCP",
            bytes(m.kernel_tcp()).is_some(),
            "cgroup v2 counts kernel memory in memory.max",
        ),
        (
            "memory.swappiness",
            m.swappiness().is_some(),
            "cgroup v2 has no per-cgroup swappiness (runc ignores it there too)",
        ),
        (
            "memory.disableOOMKiller",
            m.disable_oom_killer() == Some(true),
            "cgroup v2 cannot disable the OOM killer",
        ),
    ]);
    Ok(())
}

fn cpu_limits(c: &LinuxCpu, out: &mut Resources) -> Result<(), String> {
    ignore(&[
        (
            "cpu.realtimeRuntime",
            c.realtime_runtime().is_some_and(|v| v != 0),
            "cgroup v2 has no realtime group scheduling",
        ),
        (
            "cpu.realtimePeriod",
            c.realtime_period().is_some_and(|v| v != 0),
            "cgroup v2 has no realtime group scheduling",
        ),
    ]);
    out.cpu_idle = match c.idle() {
        None => None,
        Some(0) => Some(false),
        Some(1) => Some(true),
        Some(other) => {
            return Err(format!("linux.resources.cpu.idle {other} must be 0 or 1"));
        }
    };
    out.cpu_burst_us = c.burst();
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

/// `io.weight` for `blockIO.weight` (0: unset); the per-device fields are ignored.
fn block_io_weight(b: &LinuxBlockIo) -> Result<Option<u64>, String> {
    const HOST_DEVICES: &str = "it names host device numbers, which mean nothing in the guest";
    ignore(&[
        (
            "blockIO.leafWeight",
            b.leaf_weight().is_some_and(|w| w != 0),
            "cgroup v2 has no leaf weight",
        ),
        (
            "blockIO.weightDevice",
            per_device(b.weight_device()),
            HOST_DEVICES,
        ),
        (
            "blockIO.throttleReadBpsDevice",
            per_device(b.throttle_read_bps_device()),
            HOST_DEVICES,
        ),
        (
            "blockIO.throttleWriteBpsDevice",
            per_device(b.throttle_write_bps_device()),
            HOST_DEVICES,
        ),
        (
            "blockIO.throttleReadIOPSDevice",
            per_device(b.throttle_read_iops_device()),
            HOST_DEVICES,
        ),
        (
            "blockIO.throttleWriteIOPSDevice",
            per_device(b.throttle_write_iops_device()),
            HOST_DEVICES,
        ),
    ]);
    match b.weight() {
        None | Some(0) => Ok(None),
        Some(weight) => blkio_weight_to_io_weight(u64::from(weight))
            .map(Some)
            .ok_or_else(|| format!("linux.resources.blockIO.weight {weight} is outside 10..=1000")),
    }
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

    /// What `docker run --memory 64m --blkio-weight 500 --kernel-memory 32m
    /// --memory-swappiness 10 --cpu-rt-runtime 0` puts in config.json.
    const DOCKER_LIKE: &str = r#"{
        "devices":[{"allow":false,"access":"rwm"}],
        "memory":{"limit":67108864,"reservation":0,"swap":134217728,"kernel":33554432,
                  "swappiness":10,"disableOOMKiller":false},
        "cpu":{"shares":0,"quota":0,"period":0,"realtimeRuntime":0,"realtimePeriod":0,
               "cpus":"","mems":""},
        "pids":{"limit":0},
        "blockIO":{"weight":500,"weightDevice":[{"major":8,"minor":0,"weight":200}],
                   "throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1048576}]},
        "hugepageLimits":[{"pageSize":"2MB","limit":0}],
        "network":{"classID":1048577}
    }"#;

    #[test]
    fn test_resources_docker_like_accepted_and_converted() {
        let r = from_json(DOCKER_LIKE).unwrap();
        let want = Resources {
            memory_max: Some(64 << 20),
            io_weight: Some(4950),
            ..Resources::default()
        };
        assert_eq!(r, want);
    }

    /// What `podman run --memory 64m --pids-limit 2048 --cpu-quota 50000 --cpu-shares 512`
    /// with a cgroup v2 `--cgroup-conf` puts in config.json (swap at twice the limit).
    const PODMAN_LIKE: &str = r#"{
        "memory":{"limit":67108864,"swap":134217728,"disableOOMKiller":true},
        "cpu":{"shares":512,"quota":50000,"period":100000,"idle":0,"burst":20000},
        "pids":{"limit":2048},
        "unified":{"memory.high":"50331648","pids.max":"7"},
        "rdma":{"mlx5_1":{"hcaHandles":3}}
    }"#;

    #[test]
    fn test_resources_podman_like_accepted_and_converted() {
        let r = from_json(PODMAN_LIKE).unwrap();
        let want = Resources {
            memory_max: Some(64 << 20),
            pids_max: Some(2048),
            cpu_weight: Some(20),
            cpu_quota_us: Some(50_000),
            cpu_period_us: Some(100_000),
            cpu_idle: Some(false),
            cpu_burst_us: Some(20_000),
            unified: [
                ("memory.high".to_owned(), "50331648".to_owned()),
                ("pids.max".to_owned(), "7".to_owned()),
            ]
            .into(),
            ..Resources::default()
        };
        assert_eq!(r, want);
    }

    #[test]
    fn test_resources_swap_beyond_limit_or_without_limit_ignored() {
        let r = from_json(r#"{"memory":{"limit":1000000,"swap":2000000}}"#).unwrap();
        assert_eq!(r.memory_max, Some(1_000_000));
        let r = from_json(r#"{"memory":{"swap":2000000}}"#).unwrap();
        assert_eq!(r, Resources::default());
    }

    #[test]
    fn test_resources_swap_below_limit_refused() {
        let err = from_json(r#"{"memory":{"limit":2000000,"swap":1000000}}"#).unwrap_err();
        assert!(err.starts_with("linux.resources.memory.swap "), "{err}");
    }

    #[test]
    fn test_resources_block_io_weight_out_of_range_refused() {
        for weight in [5, 1001] {
            let err = from_json(&format!(r#"{{"blockIO":{{"weight":{weight}}}}}"#)).unwrap_err();
            assert!(err.starts_with("linux.resources.blockIO.weight "), "{err}");
        }
        let r = from_json(r#"{"blockIO":{"weight":0,"leafWeight":10}}"#).unwrap();
        assert_eq!(r.io_weight, None);
    }

    #[test]
    fn test_resources_cpu_idle_other_than_0_or_1_refused() {
        let r = from_json(r#"{"cpu":{"idle":1,"shares":1024}}"#).unwrap();
        assert_eq!((r.cpu_idle, r.cpu_weight), (Some(true), Some(39)));
        let err = from_json(r#"{"cpu":{"idle":2}}"#).unwrap_err();
        assert!(err.starts_with("linux.resources.cpu.idle 2 "), "{err}");
    }

    #[test]
    fn test_resources_burst_above_quota_refused() {
        let err = from_json(r#"{"cpu":{"quota":10000,"burst":20000}}"#).unwrap_err();
        assert!(err.starts_with("linux.resources: cpu burst"), "{err}");
    }

    #[test]
    fn test_resources_unified_core_file_or_path_refused() {
        for key in [
            "cgroup.procs",
            "cgroup.subtree_control",
            "../pids.max",
            "pids",
        ] {
            let err = from_json(&format!(r#"{{"unified":{{"{key}":"1"}}}}"#)).unwrap_err();
            assert!(err.starts_with("linux.resources: unified key"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}
