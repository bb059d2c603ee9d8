//! config.json `process` beyond env and cwd: `args` (never empty), `user`, `rlimits`,
//! `noNewPrivileges`, `oomScoreAdj` and `capabilities` (OCI runtime spec 1.2, config.md), and
//! the process fields husk refuses because the guest cannot honour them. One conversion for a
//! container's first process (config.json) and for an exec process (`exec -p`, the shim's
//! Exec).

use husk_protocol::{Capabilities, Rlimit, User};
use oci_spec::runtime::{Capabilities as OciCapabilities, LinuxCapabilities, Process};

/// The agent's view of the process attributes this module converts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ProcessAttrs {
    pub args: Vec<String>,
    pub user: User,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
    pub capabilities: Option<Capabilities>,
}

/// Converts the supported attributes; an unsupported one that is set is an error.
pub(super) fn attrs(process: &Process) -> Result<ProcessAttrs, String> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err("process.args must not be empty".into());
    }
    refuse_unsupported(process)?;
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Rlimit {
            kind: r.typ().to_string(),
            soft: r.soft(),
            hard: r.hard(),
        })
        .collect();
    let user = process.user();
    Ok(ProcessAttrs {
        args,
        user: User {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
        },
        rlimits,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        oom_score_adj: process.oom_score_adj(),
        capabilities: process.capabilities().as_ref().map(capabilities),
    })
}

fn capabilities(caps: &LinuxCapabilities) -> Capabilities {
    Capabilities {
        bounding: names(caps.bounding()),
        effective: names(caps.effective()),
        inheritable: names(caps.inheritable()),
        permitted: names(caps.permitted()),
        ambient: names(caps.ambient()),
    }
}

/// `CAP_*` names of a set, sorted (the set is a hash set).
fn names(set: &Option<OciCapabilities>) -> Vec<String> {
    let mut names: Vec<String> = set
        .iter()
        .flatten()
        .map(|cap| format!("CAP_{cap}"))
        .collect();
    names.sort();
    names
}

/// Process fields the guest cannot honour yet: present and non-empty is an error.
fn refuse_unsupported(process: &Process) -> Result<(), String> {
    let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let refused = [
        ("apparmorProfile", set(process.apparmor_profile())),
        ("selinuxLabel", set(process.selinux_label())),
        ("ioPriority", process.io_priority().is_some()),
        ("scheduler", process.scheduler().is_some()),
        ("execCPUAffinity", process.exec_cpu_affinity().is_some()),
        ("commandLine", set(process.command_line())),
    ];
    match refused.into_iter().find(|(_, is_set)| *is_set) {
        Some((field, _)) => Err(format!(
            "process.{field} is not supported by husk; remove it"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::Capability;

    use super::*;

    #[test]
    fn test_attrs_default_process_maps_rlimits_caps_nnp() {
        let a = attrs(&Process::default()).unwrap();
        assert_eq!(
            a.rlimits,
            vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 1024,
                hard: 1024
            }]
        );
        assert!(a.no_new_privileges);
        let caps = a.capabilities.unwrap();
        assert_eq!(
            caps.bounding,
            ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        );
        assert_eq!(caps.ambient, caps.bounding);
    }

    #[test]
    fn test_names_match_serde_names_for_every_capability() {
        let all: OciCapabilities = serde_json::from_str::<Vec<Capability>>(
            r#"["CAP_SYS_ADMIN","CAP_CHECKPOINT_RESTORE","CAP_BPF","CAP_DAC_READ_SEARCH","CAP_SETFCAP"]"#,
        )
        .unwrap()
        .into_iter()
        .collect();
        for name in names(&Some(all)) {
            assert!(serde_json::to_string(&name).is_ok());
            let back: Capability = serde_json::from_value(name.clone().into()).unwrap();
            assert_eq!(format!("CAP_{back}"), name);
        }
    }

    #[test]
    fn test_attrs_apparmor_profile_rejected() {
        let mut p = Process::default();
        p.set_apparmor_profile(Some("docker-default".into()));
        let err = attrs(&p).unwrap_err();
        assert!(err.contains("apparmorProfile"), "{err}");
    }
}
