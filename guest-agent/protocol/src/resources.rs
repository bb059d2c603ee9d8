//! cgroup v2 limits of a container (config-linux.md `linux.resources`, converted by the host
//! to the v2 interface files as runc does), with their checks.

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
}

/// Period of `cpu.max` when only a quota is given (the kernel's default).
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

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
        Ok(())
    }
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
}
