//! Process attributes of a [`crate::ContainerSpec`] beyond argv and credentials: resource
//! limits and capabilities (OCI runtime spec 1.2, config.md `process.rlimits` and
//! `process.capabilities`), with the checks the agent runs before trusting them.

use serde::{Deserialize, Serialize};

/// The `process.rlimits[].type` values the agent applies (getrlimit(2)).
pub const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
];

/// One resource limit, set with setrlimit(2) right before the process is executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// One of [`RLIMIT_NAMES`].
    pub kind: String,
    /// Soft limit (`u64::MAX` is unlimited).
    pub soft: u64,
    /// Hard limit; at least `soft`.
    pub hard: u64,
}

/// The five capability sets of the process (capabilities(7)); each entry a `CAP_*` name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Bounding set: what the process and its children can ever gain.
    #[serde(default)]
    pub bounding: Vec<String>,
    /// Effective set.
    #[serde(default)]
    pub effective: Vec<String>,
    /// Inheritable set.
    #[serde(default)]
    pub inheritable: Vec<String>,
    /// Permitted set.
    #[serde(default)]
    pub permitted: Vec<String>,
    /// Ambient set (kept across execve of a non-root user).
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// Most names in one capability set: the kernel knows 41 capabilities; a list may repeat one.
pub const MAX_SET_NAMES: usize = 64;

/// Lowest and highest `oom_score_adj` (proc(5)).
pub const OOM_SCORE_ADJ_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// Checks rlimits: known names, each at most once, soft <= hard.
pub(crate) fn validate_rlimits(rlimits: &[Rlimit]) -> Result<(), String> {
    for (i, r) in rlimits.iter().enumerate() {
        if !RLIMIT_NAMES.contains(&r.kind.as_str()) {
            return Err(format!("unknown rlimit type {:?}", r.kind));
        }
        if r.soft > r.hard {
            return Err(format!(
                "rlimit {}: soft limit {} is above the hard limit {}",
                r.kind, r.soft, r.hard
            ));
        }
        if rlimits.iter().skip(i + 1).any(|o| o.kind == r.kind) {
            return Err(format!("rlimit {} is set twice", r.kind));
        }
    }
    Ok(())
}

impl Capabilities {
    /// Every set with its name, for checks and messages.
    pub fn sets(&self) -> [(&'static str, &[String]); 5] {
        [
            ("bounding", &self.bounding),
            ("effective", &self.effective),
            ("inheritable", &self.inheritable),
            ("permitted", &self.permitted),
            ("ambient", &self.ambient),
        ]
    }

    /// Checks that every set has at most [`MAX_SET_NAMES`] entries and that every entry looks
    /// like a capability name (`CAP_` and upper-case letters or `_`); whether the kernel knows
    /// it is the agent's check.
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (set, names) in self.sets() {
            if names.len() > MAX_SET_NAMES {
                return Err(format!(
                    "capabilities.{set} has {} entries, more than {MAX_SET_NAMES}",
                    names.len()
                ));
            }
            for name in names {
                let well_formed = name.len() <= 32
                    && name.strip_prefix("CAP_").is_some_and(|rest| {
                        !rest.is_empty()
                            && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                    });
                if !well_formed {
                    return Err(format!("capabilities.{set}: invalid capability {name:?}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile(soft: u64, hard: u64) -> Rlimit {
        Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            soft,
            hard,
        }
    }

    #[test]
    fn test_validate_rlimits_soft_above_hard_rejected() {
        assert!(validate_rlimits(&[nofile(10, 20)]).is_ok());
        assert!(validate_rlimits(&[nofile(30, 20)]).is_err());
    }

    #[test]
    fn test_validate_rlimits_unknown_or_twice_rejected() {
        let mut bad = nofile(1, 1);
        bad.kind = "RLIMIT_BOGUS".into();
        assert!(validate_rlimits(&[bad]).is_err());
        assert!(validate_rlimits(&[nofile(1, 1), nofile(2, 2)]).is_err());
    }

    #[test]
    fn test_capabilities_validate_too_many_names_rejected() {
        let mut caps = Capabilities {
            permitted: vec!["CAP_KILL".into(); MAX_SET_NAMES],
            ..Capabilities::default()
        };
        assert!(caps.validate().is_ok());
        caps.permitted.push("CAP_KILL".into());
        assert!(caps.validate().is_err());
    }

    #[test]
    fn test_capabilities_validate_malformed_names_rejected() {
        let ok = Capabilities {
            bounding: vec!["CAP_KILL".into(), "CAP_NET_BIND_SERVICE".into()],
            ..Capabilities::default()
        };
        assert!(ok.validate().is_ok());
        for name in ["KILL", "CAP_", "cap_kill", "CAP_KILL\0", "CAP_../x"] {
            let bad = Capabilities {
                ambient: vec![name.into()],
                ..Capabilities::default()
            };
            assert!(bad.validate().is_err(), "{name:?}");
        }
    }
}
