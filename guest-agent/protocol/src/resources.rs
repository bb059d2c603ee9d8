//! cgroup v2 limits of a container (config-linux.md `linux.resources`, converted by the host
//! to the v2 interface files as runc does), with their checks. `unified` carries raw v2
//! interface files (`<controller>.<name>` -> one-line value), checked so that a key stays a
//! file of the container's own cgroup and never one of its core files that would break it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Limits the agent writes into the container's cgroup before its process runs; `None`
/// leaves the kernel's default (no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// `memory.max` in bytes.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// `memory.low` in bytes (`memory.reservation`).
    #[serde(default)]
    pub memory_low: Option<u64>,
    /// `pids.max`.
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// `cpu.weight`, 1..=10000 (from `cpu.shares`).
    #[serde(default)]
    pub cpu_weight: Option<u64>,
    /// `cpu.max`: quota in microseconds per period (`None`: no quota).
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    /// `cpu.max` period in microseconds, 1000..=1000000.
    #[serde(default)]
    pub cpu_period_us: Option<u64>,
    /// `cpuset.cpus`, a CPU list (`0-1,3`).
    #[serde(default)]
    pub cpuset_cpus: Option<String>,
    /// `cpuset.mems`, a memory node list.
    #[serde(default)]
    pub cpuset_mems: Option<String>,
    /// `io.weight`, 1..=10000 (from `blockIO.weight`); left out where the guest kernel has
    /// no io controller (version 7).
    #[serde(default)]
    pub io_weight: Option<u64>,
    /// `cpu.idle`: the cgroup's tasks run as `SCHED_IDLE`; then `cpu.weight` stays as it is,
    /// as the kernel refuses a weight for an idle group (version 7).
    #[serde(default)]
    pub cpu_idle: Option<bool>,
    /// `cpu.max.burst` in microseconds, at most the quota (version 7).
    #[serde(default)]
    pub cpu_burst_us: Option<u64>,
    /// Raw cgroup v2 interface files (`linux.resources.unified`), written after the others
    /// (version 7).
    #[serde(default)]
    pub unified: BTreeMap<String, String>,
}

/// Period of `cpu.max` when only a quota is given (the kernel's default).
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Most entries of [`Resources::unified`].
pub const MAX_UNIFIED: usize = 64;
/// Longest key of [`Resources::unified`] (the kernel's longest v2 file names are ~30 bytes).
const MAX_UNIFIED_KEY_LEN: usize = 64;
/// Longest value of [`Resources::unified`].
const MAX_UNIFIED_VALUE_LEN: usize = 256;
/// The `cgroup.*` core files a container may set: limits on its own subtree. The others
/// (`cgroup.procs`, `cgroup.subtree_control`, `cgroup.freeze`, `cgroup.kill`, `cgroup.type`,
/// ...) are how the agent runs the container, not limits.
const UNIFIED_CORE_LIMITS: [&str; 2] = ["cgroup.max.depth", "cgroup.max.descendants"];

impl Resources {
    /// The `cpu.max` line, if the spec sets a quota or a period.
    pub fn cpu_max(&self) -> Option<String> {
        if self.cpu_quota_us.is_none() && self.cpu_period_us.is_none() {
            return None;
        }
        let period = self.cpu_period_us.unwrap_or(DEFAULT_CPU_PERIOD_US);
        Some(match self.cpu_quota_us {
            Some(quota) => format!("{quota} {period}"),
            None => format!("max {period}"),
        })
    }

    /// Checks the values the kernel would refuse.
    ///
    /// # Errors
    /// A one-line reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpu_weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
            return Err("cpu weight must be within 1..=10000".into());
        }
        if self
            .cpu_period_us
            .is_some_and(|p| !(1_000..=1_000_000).contains(&p))
        {
            return Err("cpu period must be within 1000..=1000000 microseconds".into());
        }
        if self.cpu_quota_us.is_some_and(|q| q < 1_000) {
            return Err("cpu quota must be at least 1000 microseconds".into());
        }
        for (what, list) in [("cpus", &self.cpuset_cpus), ("mems", &self.cpuset_mems)] {
            let ok = list.as_deref().is_none_or(|l| {
                l.len() <= 256
                    && l.bytes()
                        .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
            });
            if !ok {
                return Err(format!("cpuset {what} must be a list like 0-1,3"));
            }
        }
        if self.io_weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
            return Err("io weight must be within 1..=10000".into());
        }
        if let (Some(burst), Some(quota)) = (self.cpu_burst_us, self.cpu_quota_us) {
            if burst > quota {
                return Err(format!(
                    "cpu burst {burst} must not exceed the cpu quota {quota} microseconds"
                ));
            }
        }
        validate_unified(&self.unified)
    }
}

/// Checks `unified`: at most [`MAX_UNIFIED`] entries, each key a v2 interface file name
/// `<controller>.<name>` (ASCII letters, digits, `_`, `-`, dots between non-empty parts: no
/// `/`, no `..`), `cgroup.*` only for the subtree limits, each value one line of 1 to 256
/// bytes without control characters.
fn validate_unified(unified: &BTreeMap<String, String>) -> Result<(), String> {
    if unified.len() > MAX_UNIFIED {
        return Err(format!("unified has more than {MAX_UNIFIED} entries"));
    }
    for (key, value) in unified {
        let parts_ok = key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !parts_ok || !key.contains('.') || key.len() > MAX_UNIFIED_KEY_LEN {
            return Err(format!(
                "unified key {key:?} is not a cgroup v2 file name like pids.max"
            ));
        }
        if key.starts_with("cgroup.") && !UNIFIED_CORE_LIMITS.contains(&key.as_str()) {
            return Err(format!(
                "unified key {key:?} is the cgroup's own interface, not a limit (only {} are allowed)",
                UNIFIED_CORE_LIMITS.join(" and ")
            ));
        }
        let value_ok = (1..=MAX_UNIFIED_VALUE_LEN).contains(&value.len())
            && !value.bytes().any(|b| b.is_ascii_control());
        if !value_ok {
            return Err(format!(
                "unified {key:?} value must be one line of 1 to {MAX_UNIFIED_VALUE_LEN} bytes"
            ));
        }
    }
    Ok(())
}

/// `cpu.weight` for a cgroup v1 `cpu.shares` value (2..=262144), runc's conversion:
/// `1 + ((shares - 2) * 9999) / 262142`; 0 means unset.
pub fn cpu_shares_to_weight(shares: u64) -> Option<u64> {
    match shares {
        0 => None,
        s => {
            let s = s.clamp(2, 262_144);
            Some(1 + ((s - 2) * 9_999) / 262_142)
        }
    }
}

/// `io.weight` for a cgroup v1 `blkio.weight` value (10..=1000), runc's linear conversion
/// onto 1..=10000: `1 + (weight - 10) * 9999 / 990`; 0 means unset, and a value outside
/// 10..=1000 has no conversion.
pub fn blkio_weight_to_io_weight(weight: u64) -> Option<u64> {
    match weight {
        10..=1000 => Some(1 + (weight - 10) * 9_999 / 990),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpu_shares_to_weight_matches_runc() {
        assert_eq!(cpu_shares_to_weight(0), None);
        assert_eq!(cpu_shares_to_weight(2), Some(1));
        assert_eq!(cpu_shares_to_weight(1024), Some(39));
        assert_eq!(cpu_shares_to_weight(262_144), Some(10_000));
    }

    #[test]
    fn test_cpu_max_quota_and_period() {
        let mut r = Resources::default();
        assert_eq!(r.cpu_max(), None);
        r.cpu_quota_us = Some(50_000);
        assert_eq!(r.cpu_max().as_deref(), Some("50000 100000"));
        r.cpu_quota_us = None;
        r.cpu_period_us = Some(20_000);
        assert_eq!(r.cpu_max().as_deref(), Some("max 20000"));
    }

    #[test]
    fn test_validate_bad_values_rejected() {
        let bad = [
            Resources {
                cpu_weight: Some(0),
                ..Resources::default()
            },
            Resources {
                cpu_period_us: Some(10),
                ..Resources::default()
            },
            Resources {
                cpuset_cpus: Some("0\n+memory".into()),
                ..Resources::default()
            },
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        let ok = Resources {
            cpuset_cpus: Some("0-1,3".into()),
            cpu_weight: Some(100),
            ..Resources::default()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn test_blkio_weight_to_io_weight_matches_runc() {
        assert_eq!(blkio_weight_to_io_weight(0), None);
        assert_eq!(blkio_weight_to_io_weight(9), None);
        assert_eq!(blkio_weight_to_io_weight(10), Some(1));
        assert_eq!(blkio_weight_to_io_weight(500), Some(4950));
        assert_eq!(blkio_weight_to_io_weight(1000), Some(10_000));
        assert_eq!(blkio_weight_to_io_weight(1001), None);
    }

    #[test]
    fn test_validate_io_weight_and_burst_out_of_bounds_rejected() {
        let bad = [
            Resources {
                io_weight: Some(0),
                ..Resources::default()
            },
            Resources {
                io_weight: Some(10_001),
                ..Resources::default()
            },
            Resources {
                cpu_quota_us: Some(50_000),
                cpu_burst_us: Some(50_001),
                ..Resources::default()
            },
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        let ok = Resources {
            io_weight: Some(10_000),
            cpu_idle: Some(true),
            cpu_quota_us: Some(50_000),
            cpu_burst_us: Some(50_000),
            ..Resources::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    fn unified(key: &str, value: &str) -> Resources {
        Resources {
            unified: [(key.to_owned(), value.to_owned())].into(),
            ..Resources::default()
        }
    }

    #[test]
    fn test_validate_unified_v2_file_names_accepted() {
        for key in [
            "pids.max",
            "memory.high",
            "memory.oom.group",
            "hugetlb.2MB.max",
            "cpu.weight.nice",
            "cgroup.max.depth",
            "cgroup.max.descendants",
        ] {
            assert_eq!(unified(key, "10").validate(), Ok(()), "{key}");
        }
        assert_eq!(unified("cpu.max", "50000 100000").validate(), Ok(()));
    }

    #[test]
    fn test_validate_unified_paths_and_bad_names_rejected() {
        let long = format!("pids.{}", "x".repeat(MAX_UNIFIED_KEY_LEN));
        for key in [
            "pids",
            "../pids.max",
            "pids.max/../../x",
            "containers/x/pids.max",
            "pids..max",
            ".pids.max",
            "pids.max.",
            "pids.max\0",
            "pids.m\u{e4}x",
            "",
            long.as_str(),
        ] {
            let err = unified(key, "1").validate().unwrap_err();
            assert!(err.contains("not a cgroup v2 file name"), "{key}: {err}");
        }
    }

    #[test]
    fn test_validate_unified_core_files_rejected() {
        for key in [
            "cgroup.procs",
            "cgroup.threads",
            "cgroup.subtree_control",
            "cgroup.freeze",
            "cgroup.kill",
            "cgroup.type",
        ] {
            let err = unified(key, "1").validate().unwrap_err();
            assert!(err.contains("own interface, not a limit"), "{key}: {err}");
        }
    }

    #[test]
    fn test_validate_unified_values_not_one_bounded_line_rejected() {
        let long = "1".repeat(MAX_UNIFIED_VALUE_LEN + 1);
        for value in ["", "1\n+memory", "max\r", "\0", long.as_str()] {
            assert!(unified("pids.max", value).validate().is_err(), "{value:?}");
        }
        let many = Resources {
            unified: (0..=MAX_UNIFIED)
                .map(|i| (format!("misc.k{i}"), "1".to_owned()))
                .collect(),
            ..Resources::default()
        };
        assert!(many.validate().is_err());
    }

    #[test]
    fn test_resources_without_version_7_fields_decoded_as_unset() {
        let r: Resources = serde_json::from_str(r#"{"pids_max":7}"#).unwrap();
        assert_eq!(r.pids_max, Some(7));
        assert_eq!(
            (r.io_weight, r.cpu_idle, r.cpu_burst_us),
            (None, None, None)
        );
        assert!(r.unified.is_empty());
    }
}
