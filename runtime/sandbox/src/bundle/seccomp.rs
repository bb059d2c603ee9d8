//! config.json `linux.seccomp` -> the agent's profile (config-linux.md). The agent compiles
//! it for x86_64, the only architecture the guest runs; `SCMP_ACT_NOTIFY` (a listener on the
//! host), filter flags other than `SECCOMP_FILTER_FLAG_TSYNC` (container-init is single
//! threaded: TSYNC changes nothing) and a `listenerPath` are refused.

use husk_protocol::{ArgOp, Seccomp, SeccompAction, SyscallArg, SyscallRule};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction as A, LinuxSeccompFilterFlag, LinuxSeccompOperator as Op,
};

/// Converts the profile; what the guest cannot honour is an error.
pub(super) fn seccomp(s: &LinuxSeccomp) -> Result<Seccomp, String> {
    let unsupported_flag = s
        .flags()
        .iter()
        .flatten()
        .find(|f| **f != LinuxSeccompFilterFlag::SeccompFilterFlagTsync);
    if let Some(flag) = unsupported_flag {
        return Err(format!("linux.seccomp.flags: {flag:?} is not supported"));
    }
    if s.listener_path().is_some() {
        return Err("linux.seccomp.listenerPath is not supported".into());
    }
    let architectures = s
        .architectures()
        .iter()
        .flatten()
        .map(|a| match serde_json::to_value(a) {
            Ok(serde_json::Value::String(name)) => Ok(name),
            _ => Err(format!("linux.seccomp: unknown architecture {a:?}")),
        })
        .collect::<Result<_, _>>()?;
    let syscalls = s
        .syscalls()
        .iter()
        .flatten()
        .map(|rule| {
            Ok(SyscallRule {
                names: rule.names().clone(),
                action: action(rule.action())?,
                errno: rule.errno_ret(),
                args: rule
                    .args()
                    .iter()
                    .flatten()
                    .map(arg)
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Seccomp {
        default_action: action(s.default_action())?,
        default_errno: s.default_errno_ret(),
        architectures,
        syscalls,
    })
}

fn action(a: A) -> Result<SeccompAction, String> {
    Ok(match a {
        // SCMP_ACT_KILL is libseccomp's name for killing the thread.
        A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
        A::ScmpActKillProcess => SeccompAction::KillProcess,
        A::ScmpActTrap => SeccompAction::Trap,
        A::ScmpActErrno => SeccompAction::Errno,
        A::ScmpActTrace => SeccompAction::Trace,
        A::ScmpActLog => SeccompAction::Log,
        A::ScmpActAllow => SeccompAction::Allow,
        A::ScmpActNotify => return Err("linux.seccomp: SCMP_ACT_NOTIFY is not supported".into()),
    })
}

fn arg(a: &oci_spec::runtime::LinuxSeccompArg) -> Result<SyscallArg, String> {
    Ok(SyscallArg {
        index: u8::try_from(a.index())
            .ok()
            .filter(|i| *i <= 5)
            .ok_or_else(|| format!("linux.seccomp: argument index {} above 5", a.index()))?,
        value: a.value(),
        value_two: a.value_two().unwrap_or(0),
        op: match a.op() {
            Op::ScmpCmpNe => ArgOp::Ne,
            Op::ScmpCmpLt => ArgOp::Lt,
            Op::ScmpCmpLe => ArgOp::Le,
            Op::ScmpCmpEq => ArgOp::Eq,
            Op::ScmpCmpGe => ArgOp::Ge,
            Op::ScmpCmpGt => ArgOp::Gt,
            Op::ScmpCmpMaskedEq => ArgOp::MaskedEq,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(json: &str) -> Result<Seccomp, String> {
        seccomp(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn test_seccomp_profile_converted() {
        let s = from_json(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1,
                             "args":[{"index":1,"value":448,"op":"SCMP_CMP_EQ"}]}]}"#,
        )
        .unwrap();
        assert_eq!(s.default_action, SeccompAction::Allow);
        assert_eq!(s.architectures, ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]);
        assert_eq!(s.syscalls[0].action, SeccompAction::Errno);
        assert_eq!(s.syscalls[0].args[0].op, ArgOp::Eq);
    }

    #[test]
    fn test_seccomp_notify_rejected() {
        let err = from_json(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).unwrap_err();
        assert!(err.contains("NOTIFY"), "{err}");
    }
}
