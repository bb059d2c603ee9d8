//! The process's limits and privileges, applied by container-init right before exec, in
//! runc's order: rlimits and `oom_score_adj` (lowering them needs privileges that are dropped
//! later), the capability bounding set (needs CAP_SETPCAP), then the user switch with
//! keep-caps so that a non-root user keeps the configured permitted set, then the effective,
//! permitted, inheritable and ambient sets, and `no_new_privs` last.

use std::collections::HashSet;
use std::io;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use husk_protocol::{Capabilities, ContainerSpec, Rlimit};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};

/// Everything before the user switch. Returns why it failed.
pub fn before_user(spec: &ContainerSpec) -> Result<(), String> {
    for rlimit in &spec.rlimits {
        set_rlimit(rlimit).map_err(|e| format!("setrlimit {}: {e}", rlimit.kind))?;
    }
    if let Some(adj) = spec.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("write oom_score_adj {adj}: {e}"))?;
    }
    if let Some(caps) = &spec.capabilities {
        let bounding = cap_set(&caps.bounding)?;
        for cap in caps::all().difference(&bounding) {
            // A capability the guest kernel does not know is not in its bounding set either.
            if caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, *cap)
                    .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
            }
        }
        prctl::set_keepcaps(true).map_err(|e| format!("PR_SET_KEEPCAPS: {e}"))?;
    }
    Ok(())
}

/// Everything after the user switch. Returns why it failed.
pub fn after_user(spec: &ContainerSpec) -> Result<(), String> {
    if let Some(caps) = &spec.capabilities {
        prctl::set_keepcaps(false).map_err(|e| format!("PR_CLEAR_KEEPCAPS: {e}"))?;
        apply_sets(caps)?;
    }
    if spec.no_new_privileges {
        prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    }
    Ok(())
}

/// Sets the inheritable set first (widening it needs CAP_SETPCAP, still effective), then the
/// effective one (a subset of the still full permitted set), then permitted, then ambient
/// (each ambient capability must be permitted and inheritable).
fn apply_sets(caps: &Capabilities) -> Result<(), String> {
    let sets = [
        (CapSet::Inheritable, &caps.inheritable),
        (CapSet::Effective, &caps.effective),
        (CapSet::Permitted, &caps.permitted),
    ];
    for (set, names) in sets {
        let value = cap_set(names)?;
        caps::set(None, set, &value).map_err(|e| format!("set {set:?} capabilities: {e}"))?;
    }
    let ambient = cap_set(&caps.ambient)?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient capabilities: {e}"))?;
    for cap in ambient {
        caps::raise(None, CapSet::Ambient, cap)
            .map_err(|e| format!("raise ambient capability {cap}: {e}"))?;
    }
    Ok(())
}

fn cap_set(names: &[String]) -> Result<CapsHashSet, String> {
    names
        .iter()
        .map(|name| Capability::from_str(name).map_err(|_| format!("unknown capability {name:?}")))
        .collect::<Result<HashSet<_>, _>>()
}

fn set_rlimit(rlimit: &Rlimit) -> io::Result<()> {
    let resource = match rlimit.kind.as_str() {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        other => return Err(io::Error::other(format!("unknown rlimit {other:?}"))),
    };
    setrlimit(resource, rlimit.soft, rlimit.hard).map_err(io::Error::from)
}
