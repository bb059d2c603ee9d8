//! A seccomp profile (config-linux.md `linux.seccomp`), as the agent compiles it into BPF
//! right before exec: the default action, per-syscall rules with argument conditions, and
//! their checks.

use serde::{Deserialize, Serialize};

/// The profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seccomp {
    /// What a syscall no rule matches gets.
    pub default_action: SeccompAction,
    /// errno of a default `errno`/`trace` action (EPERM when absent, as runc).
    #[serde(default)]
    pub default_errno: Option<u32>,
    /// `SCMP_ARCH_*` names the profile is written for; the guest runs x86_64 only.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Rules, in order.
    #[serde(default)]
    pub syscalls: Vec<SyscallRule>,
}

/// What a filter does with a syscall (seccomp(2) `SECCOMP_RET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    /// Kill the whole process.
    KillProcess,
    /// Kill the calling thread.
    KillThread,
    /// SIGSYS.
    Trap,
    /// Fail with an errno.
    Errno,
    /// Notify a tracer.
    Trace,
    /// Allow, and log.
    Log,
    /// Allow.
    Allow,
}

/// Syscalls sharing an action and argument conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallRule {
    /// Syscall names (`mkdir`); names the guest's architecture lacks are skipped, as runc.
    pub names: Vec<String>,
    /// What a matching call gets.
    pub action: SeccompAction,
    /// errno of an `errno`/`trace` action (EPERM when absent).
    #[serde(default)]
    pub errno: Option<u32>,
    /// Conditions on the arguments: all must hold (or, when an argument index repeats, any).
    #[serde(default)]
    pub args: Vec<SyscallArg>,
}

/// One condition on a syscall argument, compared as 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallArg {
    /// Argument index, 0..=5.
    pub index: u8,
    /// Value compared with (the mask for `masked_eq`).
    pub value: u64,
    /// The value a masked argument must equal (`masked_eq` only).
    #[serde(default)]
    pub value_two: u64,
    /// Comparison.
    pub op: ArgOp,
}

/// Comparisons of [`SyscallArg`] (`SCMP_CMP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgOp {
    /// !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// ==
    Eq,
    /// >=
    Ge,
    /// >
    Gt,
    /// `(arg & value) == value_two`
    MaskedEq,
}

/// errno when a profile gives none (runc's default).
pub const DEFAULT_SECCOMP_ERRNO: u32 = 1;
/// Most rules a profile may have (Docker's default profile has under 100).
const MAX_RULES: usize = 4096;
/// Highest errno a filter can return (SECCOMP_RET_DATA is 16 bits; errno is at most 4095).
const MAX_ERRNO: u32 = 4095;

impl Seccomp {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.syscalls.len() > MAX_RULES {
            return Err(format!("seccomp: more than {MAX_RULES} rules"));
        }
        let errno_ok = |e: Option<u32>| e.is_none_or(|e| e <= MAX_ERRNO);
        if !errno_ok(self.default_errno) {
            return Err("seccomp: defaultErrnoRet above 4095".into());
        }
        for arch in &self.architectures {
            let rest = arch.strip_prefix("SCMP_ARCH_").unwrap_or_default();
            if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("seccomp: invalid architecture {arch:?}"));
            }
        }
        for rule in &self.syscalls {
            let bad_name = rule.names.iter().find(|n| {
                n.is_empty()
                    || n.len() > 64
                    || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
            if let Some(name) = bad_name {
                return Err(format!("seccomp: invalid syscall name {name:?}"));
            }
            if !errno_ok(rule.errno) {
                return Err("seccomp: errnoRet above 4095".into());
            }
            if rule.args.iter().any(|a| a.index > 5) {
                return Err("seccomp: argument index above 5".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(rule: SyscallRule) -> Seccomp {
        Seccomp {
            default_action: SeccompAction::Allow,
            default_errno: None,
            architectures: vec!["SCMP_ARCH_X86_64".into()],
            syscalls: vec![rule],
        }
    }

    fn rule(name: &str) -> SyscallRule {
        SyscallRule {
            names: vec![name.into()],
            action: SeccompAction::Errno,
            errno: Some(1),
            args: vec![],
        }
    }

    #[test]
    fn test_validate_bad_names_index_errno_rejected() {
        assert!(profile(rule("mkdir")).validate().is_ok());
        assert!(profile(rule("mk dir")).validate().is_err());
        assert!(profile(rule("")).validate().is_err());
        let mut r = rule("mkdir");
        r.errno = Some(70_000);
        assert!(profile(r).validate().is_err());
        let mut r = rule("mkdir");
        r.args.push(SyscallArg {
            index: 6,
            value: 0,
            value_two: 0,
            op: ArgOp::Eq,
        });
        assert!(profile(r).validate().is_err());
    }
}
