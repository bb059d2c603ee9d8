//! Entering another process's namespaces with setns(2). `exec-init` enters every namespace of
//! a container's first process ([`crate::exec_init`]); the agent enters the ones a pod's
//! container shares with another container (`join_namespaces`) on a short-lived thread right
//! before it clones that container's init ([`crate::container`]).

use std::fs::File;

use husk_protocol::Namespace;
use nix::sched::{setns, CloneFlags};
use nix::unistd::Pid;

/// Every namespace, in the order they are joined: user first (it grants the rights to join
/// the others), mount last (it changes what /proc paths name).
pub const ALL: [Namespace; 7] = [
    Namespace::User,
    Namespace::Cgroup,
    Namespace::Ipc,
    Namespace::Uts,
    Namespace::Net,
    Namespace::Pid,
    Namespace::Mount,
];

/// The name of `ns` under `/proc/<pid>/ns/` and its setns(2) type.
fn proc_name_and_flag(ns: Namespace) -> (&'static str, CloneFlags) {
    match ns {
        Namespace::User => ("user", CloneFlags::CLONE_NEWUSER),
        Namespace::Cgroup => ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        Namespace::Ipc => ("ipc", CloneFlags::CLONE_NEWIPC),
        Namespace::Uts => ("uts", CloneFlags::CLONE_NEWUTS),
        Namespace::Net => ("net", CloneFlags::CLONE_NEWNET),
        Namespace::Pid => ("pid", CloneFlags::CLONE_NEWPID),
        Namespace::Mount => ("mnt", CloneFlags::CLONE_NEWNS),
    }
}

/// Makes the calling thread enter the namespaces `kinds` of process `pid`, in [`ALL`]'s order;
/// one the thread is in already is skipped. Every namespace file is opened before the first
/// setns, as /proc may name other things afterwards. A pid namespace applies to the children
/// created afterwards only (pid_namespaces(7)): the caller must fork or clone to use it.
///
/// # Errors
/// Which namespace could not be opened or entered, and why.
pub fn join(pid: Pid, kinds: &[Namespace]) -> Result<(), String> {
    let ns_link = |name: &str, of: &str| std::fs::read_link(format!("/proc/{of}/ns/{name}")).ok();
    let target = pid.to_string();
    let files = ALL
        .iter()
        .filter(|ns| kinds.contains(ns))
        .map(|&ns| proc_name_and_flag(ns))
        .filter(|(name, _)| ns_link(name, "thread-self") != ns_link(name, &target))
        .map(|(name, flag)| {
            File::open(format!("/proc/{target}/ns/{name}"))
                .map(|f| (f, flag, name))
                .map_err(|e| format!("open {name} namespace of pid {target}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (file, flag, name) in files {
        setns(file, flag).map_err(|e| format!("join {name} namespace of pid {target}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_join_own_namespaces_skipped() {
        let own = Pid::from_raw(i32::try_from(std::process::id()).unwrap());
        assert_eq!(join(own, &ALL), Ok(()));
    }

    #[test]
    fn test_join_missing_process_names_namespace() {
        // Pid numbers stop below 2^22 (pid_max), so this one never exists.
        let err = join(Pid::from_raw(i32::MAX), &[Namespace::Net]).unwrap_err();
        assert!(err.contains("net namespace"), "{err}");
    }
}
