//! The process's limits and privileges, applied right before it runs, by container-init for a
//! container's first process and by exec-init for an exec process, in runc's order: rlimits
//! and `oom_score_adj` (lowering them needs privileges that are dropped later), the capability
//! bounding set (needs CAP_SETPCAP), then the user switch with keep-caps so that a non-root
//! user keeps the configured permitted set, then the effective, permitted, inheritable and
//! ambient sets, and `no_new_privs` last.

use std::collections::HashSet;
use std::io;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use husk_protocol::{Capabilities, ContainerSpec, ExecInit, Rlimit, User};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

/// What [`apply`] sets: the same fields of a container's first process and of an exec one.
#[derive(Debug, Clone, Copy)]
pub struct Privileges<'a> {
    pub rlimits: &'a [Rlimit],
    pub oom_score_adj: Option<i32>,
    /// `None` keeps the full set of root.
    pub capabilities: Option<&'a Capabilities>,
    pub no_new_privileges: bool,
    pub user: &'a User,
}

impl<'a> From<&'a ContainerSpec> for Privileges<'a> {
    fn from(spec: &'a ContainerSpec) -> Self {
        Self {
            rlimits: &spec.rlimits,
            oom_score_adj: spec.oom_score_adj,
            capabilities: spec.capabilities.as_ref(),
            no_new_privileges: spec.no_new_privileges,
            user: &spec.user,
        }
    }
}

impl<'a> From<&'a ExecInit> for Privileges<'a> {
    fn from(init: &'a ExecInit) -> Self {
        let p = &init.process;
        Self {
            rlimits: &p.rlimits,
            oom_score_adj: init.oom_score_adj,
            capabilities: p.capabilities.as_ref(),
            no_new_privileges: p.no_new_privileges,
            user: &p.user,
        }
    }
}

/// Limits, bounding set, user, capability sets and `no_new_privs`, in that order, on the
/// calling process. Returns why it failed.
pub fn apply(privileges: &Privileges<'_>) -> Result<(), String> {
    before_user(privileges)?;
    let user = privileges.user;
    set_user(user).map_err(|e| format!("set user {}:{}: {e}", user.uid, user.gid))?;
    after_user(privileges)
}

/// Everything before the user switch.
fn before_user(p: &Privileges<'_>) -> Result<(), String> {
    for rlimit in p.rlimits {
        set_rlimit(rlimit).map_err(|e| format!("setrlimit {}: {e}", rlimit.kind))?;
    }
    set_oom_score_adj(p.oom_score_adj)?;
    if let Some(caps) = p.capabilities {
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

/// Writes the calling process's `oom_score_adj`, if any. Returns why it failed.
pub fn set_oom_score_adj(adj: Option<i32>) -> Result<(), String> {
    match adj {
        Some(adj) => std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("write oom_score_adj {adj}: {e}")),
        None => Ok(()),
    }
}

/// Supplementary groups, group, then user (setuid last: it drops the right to the others).
fn set_user(user: &User) -> nix::Result<()> {
    let groups: Vec<Gid> = user
        .additional_gids
        .iter()
        .copied()
        .map(Gid::from_raw)
        .collect();
    setgroups(&groups)?;
    setgid(Gid::from_raw(user.gid))?;
    setuid(Uid::from_raw(user.uid))
}

/// Everything after the user switch.
fn after_user(p: &Privileges<'_>) -> Result<(), String> {
    if let Some(caps) = p.capabilities {
        prctl::set_keepcaps(false).map_err(|e| format!("PR_CLEAR_KEEPCAPS: {e}"))?;
        apply_sets(caps)?;
    }
    if p.no_new_privileges {
        prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    }
    Ok(())
}

/// Sets the inheritable set first (widening it needs CAP_SETPCAP, still effective), then the
/// effective one (a subset of the still full permitted set), then permitted, then ambient.
/// An ambient capability must be permitted and inheritable; one that is not is left out, not
/// an error, as runc (its `exec --cap` asks for such ones).
fn apply_sets(caps: &Capabilities) -> Result<(), String> {
    let inheritable = cap_set(&caps.inheritable)?;
    let permitted = cap_set(&caps.permitted)?;
    let sets = [
        (CapSet::Inheritable, &inheritable),
        (CapSet::Effective, &cap_set(&caps.effective)?),
        (CapSet::Permitted, &permitted),
    ];
    for (set, value) in sets {
        caps::set(None, set, value).map_err(|e| format!("set {set:?} capabilities: {e}"))?;
    }
    let ambient = cap_set(&caps.ambient)?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient capabilities: {e}"))?;
    let raisable = ambient
        .intersection(&inheritable)
        .filter(|c| permitted.contains(c));
    for cap in raisable {
        caps::raise(None, CapSet::Ambient, *cap)
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
