//! config.json `mounts` and `linux` -> the agent's mounts, masked and read-only paths and
//! sysctls (OCI runtime spec 1.2, config.md and config-linux.md), and the `linux` fields
//! husk refuses because the guest cannot honour them yet. `linux.cgroupsPath` names the
//! container's cgroup on the host, which holds its VM's host processes (husk-hypervisor's
//! `cgroup`); it is checked there, when the cgroup is made.
//!
//! Ignored on purpose (documented in README.md): mount propagation options (every mount in
//! the guest is private; there is no host mount tree to propagate to; the container's root
//! alone takes `linux.rootfsPropagation`, for the mounts made inside it), `linux.resources.devices` (the VM is the device boundary: the guest has only the
//! container's own devices), `annotations`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::binds::BindShares;
use super::PodRole;
use husk_hypervisor::ShareEntry;
use husk_protocol::{
    IdMapping, JoinNamespace, Mount, MountFlag, MountKind, Namespace, RecursiveAttrs, Resources,
    RootPropagation, Seccomp,
};
use oci_spec::runtime::{Linux, LinuxIdMapping, LinuxPersonalityDomain, Mount as OciMount, Spec};

/// The agent's view of what this module converts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LinuxAttrs {
    pub mounts: Vec<Mount>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: BTreeMap<String, String>,
    pub namespaces: Vec<Namespace>,
    pub resources: Resources,
    pub seccomp: Option<Seccomp>,
    pub personality: Option<husk_protocol::Personality>,
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
    pub bind_entries: Vec<ShareEntry>,
    pub join_namespaces: Vec<JoinNamespace>,
    /// A pod's sandbox container: the pod's network namespace on the host (CNI's).
    pub pod_netns: Option<PathBuf>,
    /// `linux.cgroupsPath`, when set and not empty.
    pub cgroups_path: Option<String>,
    /// `linux.resources.cpu.shares` as given (the host cgroup's `cpu.shares`).
    pub cpu_shares: Option<u64>,
    /// `linux.devices`: nodes the agent makes in the container (guest kernel devices).
    pub devices: Vec<husk_protocol::Device>,
    /// `linux.rootfsPropagation`.
    pub rootfs_propagation: Option<RootPropagation>,
}

/// Converts `mounts` and the supported `linux` fields; an unsupported one that is set is an
/// error.
pub(super) fn attrs(spec: &Spec, bundle: &Path, role: PodRole<'_>) -> Result<LinuxAttrs, String> {
    refuse_unsupported_top(spec)?;
    let mut binds = BindShares::new(bundle);
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| mount(m, &mut binds))
        .collect::<Result<_, _>>()?;
    let Some(linux) = spec.linux() else {
        return Err("no linux section: husk needs at least linux.namespaces with mount".into());
    };
    refuse_unsupported(linux)?;
    let mut join_namespaces = Vec::new();
    let mut pod_netns = None;
    Ok(LinuxAttrs {
        mounts,
        masked_paths: linux.masked_paths().clone().unwrap_or_default(),
        readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        sysctl: linux
            .sysctl()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        namespaces: namespaces(linux, role, &mut join_namespaces, &mut pod_netns)?,
        join_namespaces,
        pod_netns,
        resources: match linux.resources() {
            Some(r) => super::resources::resources(r)?,
            None => Resources::default(),
        },
        personality: linux.personality().as_ref().map(personality),
        seccomp: linux
            .seccomp()
            .as_ref()
            .map(super::seccomp::seccomp)
            .transpose()?,
        uid_mappings: id_mappings(linux.uid_mappings()),
        gid_mappings: id_mappings(linux.gid_mappings()),
        bind_entries: binds.entries,
        cgroups_path: cgroups_path(linux)?,
        devices: linux
            .devices()
            .iter()
            .flatten()
            .map(device)
            .collect::<Result<_, _>>()?,
        cpu_shares: linux
            .resources()
            .as_ref()
            .and_then(|r| r.cpu().as_ref()?.shares())
            .filter(|s| *s > 0),
        rootfs_propagation: match linux.rootfs_propagation().as_deref() {
            None | Some("") => None,
            Some(value) => Some(RootPropagation::parse(value).ok_or_else(|| {
                format!("linux.rootfsPropagation {value:?} is not a propagation type")
            })?),
        },
    })
}

/// One of `linux.devices`: its mode defaults to 0666 and its owner to root, as runc's.
fn device(d: &oci_spec::runtime::LinuxDevice) -> Result<husk_protocol::Device, String> {
    use oci_spec::runtime::LinuxDeviceType;
    let path = path_string(d.path());
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => husk_protocol::DeviceKind::Char,
        LinuxDeviceType::B => husk_protocol::DeviceKind::Block,
        LinuxDeviceType::P => husk_protocol::DeviceKind::Fifo,
        other => return Err(format!("device {path}: type {other:?} is not supported")),
    };
    let number =
        |n: i64| u64::try_from(n).map_err(|_| format!("device {path}: negative number {n}"));
    Ok(husk_protocol::Device {
        kind,
        major: number(d.major())?,
        minor: number(d.minor())?,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
        path,
    })
}

/// `linux.cgroupsPath`, when set and not empty; the host cgroup's path is text.
fn cgroups_path(linux: &Linux) -> Result<Option<String>, String> {
    let Some(path) = linux.cgroups_path() else {
        return Ok(None);
    };
    match path.to_str() {
        Some("") => Ok(None),
        Some(path) => Ok(Some(path.to_owned())),
        None => Err(format!("linux.cgroupsPath {path:?} is not UTF-8")),
    }
}

fn mount(m: &OciMount, binds: &mut BindShares) -> Result<Mount, String> {
    let destination = path_string(m.destination());
    let mut options = m.options().clone().unwrap_or_default();
    if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
        return Err(format!(
            "mount {destination}: idmapped mounts are not supported"
        ));
    }
    let is_bind =
        m.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
    if is_bind {
        // With the source's submounts on the host (shared with it) or without.
        let recursive = options.iter().any(|o| o == "rbind");
        options.retain(|o| o != "bind" && o != "rbind");
        let source = m.source().as_deref();
        return bind_mount(destination, source, &options, recursive, binds);
    }
    let kind = match m.typ().as_deref() {
        Some("proc") => MountKind::Proc,
        Some("sysfs") => MountKind::Sysfs,
        Some("tmpfs") => MountKind::Tmpfs,
        Some("devpts") => MountKind::Devpts,
        Some("mqueue") => MountKind::Mqueue,
        Some("cgroup" | "cgroup2") => MountKind::Cgroup2,
        other => {
            return Err(format!(
                "mount {destination}: type {other:?} is not supported (proc, sysfs, tmpfs, devpts, mqueue, cgroup, cgroup2)"
            ))
        }
    };
    let (flags, data, recursive) =
        mount_options(&options).map_err(|e| format!("mount {destination}: {e}"))?;
    // The device name (`shm`, `proc`, ...) as the config gives it: /proc/self/mountinfo shows
    // it, as under runc.
    let device = m
        .source()
        .as_deref()
        .and_then(Path::to_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Ok(Mount {
        destination,
        kind,
        flags,
        data,
        source: None,
        device,
        recursive,
    })
}

fn bind_mount(
    destination: String,
    source: Option<&Path>,
    options: &[String],
    recursive: bool,
    binds: &mut BindShares,
) -> Result<Mount, String> {
    let (flags, data, attrs) =
        mount_options(options).map_err(|e| format!("mount {destination}: {e}"))?;
    if !data.is_empty() {
        // mount(2) ignores file-system data for a bind mount (`mode=755`, ...): so does runc.
        tracing::debug!(%destination, ?data, "bind mount: file-system options ignored");
    }
    let data = Vec::new();
    let source = source.ok_or_else(|| format!("bind mount {destination}: no source"))?;
    // A recursively read-only bind is read-only on the host too.
    let read_only = flags.contains(&MountFlag::Ro) || attrs.set & RecursiveAttrs::RDONLY != 0;
    let source = binds
        .source(source, read_only, recursive)
        .map_err(|e| format!("bind mount {destination}: {e}"))?;
    Ok(Mount {
        destination,
        kind: MountKind::Bind,
        flags,
        data,
        source: Some(source),
        device: None,
        recursive: attrs,
    })
}

/// Splits OCI mount options into generic flags (later options win: `ro` then `rw` is rw)
/// and file-system-specific data.
fn mount_options(
    options: &[String],
) -> Result<(Vec<MountFlag>, Vec<String>, RecursiveAttrs), String> {
    use MountFlag::*;
    let mut flags: Vec<MountFlag> = Vec::new();
    let mut data = Vec::new();
    let mut recursive = RecursiveAttrs::default();
    for option in options {
        if let Some((attr, set)) = recursive_option(option) {
            // As runc: what one option sets, another does not clear (`rro,rrw` is read-only:
            // the kernel sets after it clears); setting an access-time mode replaces the mode.
            match set {
                true => {
                    recursive.set |= attr;
                    if attr & RecursiveAttrs::ATIME == attr {
                        recursive.clear |= RecursiveAttrs::ATIME;
                    }
                }
                false => recursive.clear |= attr,
            }
            continue;
        }
        let (set, clear) = match option.as_str() {
            "defaults" | "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
            | "unbindable" | "runbindable" => (None, None),
            "ro" => (Some(Ro), None),
            "rw" => (None, Some(Ro)),
            "nosuid" => (Some(Nosuid), None),
            "suid" => (None, Some(Nosuid)),
            "nodev" => (Some(Nodev), None),
            "dev" => (None, Some(Nodev)),
            "noexec" => (Some(Noexec), None),
            "exec" => (None, Some(Noexec)),
            "sync" => (Some(Sync), None),
            "async" => (None, Some(Sync)),
            "dirsync" => (Some(Dirsync), None),
            "noatime" => (Some(Noatime), None),
            "atime" => (None, Some(Noatime)),
            "nodiratime" => (Some(Nodiratime), None),
            "diratime" => (None, Some(Nodiratime)),
            "relatime" => (Some(Relatime), None),
            "norelatime" => (None, Some(Relatime)),
            "strictatime" => (Some(Strictatime), None),
            "nostrictatime" => (None, Some(Strictatime)),
            "tmpcopyup" => (Some(TmpCopyUp), None),
            "remount" | "mand" | "nomand" | "idmap" | "ridmap" | "recursive" => {
                return Err(format!("option {option:?} is not supported"))
            }
            _ => {
                data.push(option.clone());
                continue;
            }
        };
        flags.retain(|f| Some(*f) != clear && Some(*f) != set);
        flags.extend(set);
    }
    Ok((flags, data, recursive))
}

/// A recursive mount option (`rro`, `rnosuid`, ...): the attribute it sets (`true`) or clears.
fn recursive_option(option: &str) -> Option<(u64, bool)> {
    type A = RecursiveAttrs;
    Some(match option {
        "rro" => (A::RDONLY, true),
        "rrw" => (A::RDONLY, false),
        "rnosuid" => (A::NOSUID, true),
        "rsuid" => (A::NOSUID, false),
        "rnodev" => (A::NODEV, true),
        "rdev" => (A::NODEV, false),
        "rnoexec" => (A::NOEXEC, true),
        "rexec" => (A::NOEXEC, false),
        "rnodiratime" => (A::NODIRATIME, true),
        "rdiratime" => (A::NODIRATIME, false),
        "rrelatime" => (A::RELATIME, true),
        "rnorelatime" => (A::RELATIME, false),
        "rnoatime" => (A::NOATIME, true),
        "ratime" => (A::NOATIME, false),
        "rstrictatime" => (A::STRICTATIME, true),
        "rnostrictatime" => (A::STRICTATIME, false),
        "rnosymfollow" => (A::NOSYMFOLLOW, true),
        "rsymfollow" => (A::NOSYMFOLLOW, false),
        _ => return None,
    })
}

/// Top-level fields the guest cannot honour yet.
fn refuse_unsupported_top(spec: &Spec) -> Result<(), String> {
    if spec.domainname().as_deref().is_some_and(|d| !d.is_empty()) {
        return Err("domainname is not supported yet; remove it".into());
    }
    Ok(())
}

/// `linux.personality`: its domain, as runc (which ignores its flags too).
fn personality(p: &oci_spec::runtime::LinuxPersonality) -> husk_protocol::Personality {
    match p.domain() {
        LinuxPersonalityDomain::PerLinux => husk_protocol::Personality::Linux,
        LinuxPersonalityDomain::PerLinux32 => husk_protocol::Personality::Linux32,
    }
}

/// `linux` fields the guest cannot honour yet: present and non-empty is an error.
fn refuse_unsupported(linux: &Linux) -> Result<(), String> {
    let some_str = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let refused = [
        ("mountLabel", some_str(linux.mount_label())),
        ("intelRdt", linux.intel_rdt().is_some()),
        ("timeOffsets", linux.time_offsets().is_some()),
        ("netDevices", linux.net_devices().is_some()),
    ];
    if let Some((field, _)) = refused.into_iter().find(|(_, set)| *set) {
        return Err(format!("linux.{field} is not supported yet; remove it"));
    }
    if let Some(policy) = linux.memory_policy() {
        memory_policy_nodes(policy.nodes().as_deref().unwrap_or(""))?;
        // Mode and flags were checked by name when config.json was read.
        tracing::debug!(
            mode = %policy.mode(),
            "linux.memoryPolicy accepted, not applied: the VM has one memory node"
        );
    }
    Ok(())
}

/// `linux.memoryPolicy.nodes`: comma-separated node numbers and ranges (`0-3,7`), as
/// set_mempolicy's nodemask; empty for none. A VM has one memory node, so the policy is
/// accepted (it only tunes placement) but there is nothing to apply.
fn memory_policy_nodes(nodes: &str) -> Result<(), String> {
    let bad =
        || format!("linux.memoryPolicy.nodes {nodes:?} is not a list of node numbers and ranges");
    const MAX_NODE: u32 = 1023;
    for part in nodes
        .split(',')
        .filter(|p| !nodes.is_empty() || !p.is_empty())
    {
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        let parse = |n: &str| n.parse::<u32>().ok().filter(|n| *n <= MAX_NODE);
        match (parse(low), parse(high)) {
            (Some(low), Some(high)) if low <= high => {}
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// `linux.namespaces`: the new ones; `time` is refused. A `path` to join is refused for a
/// container alone in its VM, means a new namespace for a pod's sandbox container (the path
/// is the pod's namespace on the host) and the sandbox container's namespace for a later one
/// of the pod (pushed to `joined`). The pod's network namespace is the exception: the sandbox
/// container stays in the agent's, where the VM's network device carries the pod's network
/// (its host path goes to `pod_netns`).
fn namespaces(
    linux: &Linux,
    role: PodRole<'_>,
    joined: &mut Vec<JoinNamespace>,
    pod_netns: &mut Option<PathBuf>,
) -> Result<Vec<Namespace>, String> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let mut out = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        let kind = match ns.typ() {
            T::Pid => Namespace::Pid,
            T::Network => Namespace::Net,
            T::Ipc => Namespace::Ipc,
            T::Uts => Namespace::Uts,
            T::Mount => Namespace::Mount,
            T::Cgroup => Namespace::Cgroup,
            T::User => Namespace::User,
            T::Time => return Err("linux.namespaces: time namespaces are not supported".into()),
        };
        match (ns.path(), role) {
            // The engine's network namespace (a pod's, or Podman's for a lone container):
            // the VMM runs there and the container has the VM's network.
            (Some(path), PodRole::Sandbox | PodRole::Alone) if kind == Namespace::Net => {
                *pod_netns = Some(path.clone());
            }
            (None, _) | (Some(_), PodRole::Sandbox) => out.push(kind),
            (Some(_), PodRole::Member { sandbox }) => joined.push(JoinNamespace {
                kind,
                container: sandbox.to_owned(),
            }),
            (Some(path), PodRole::Alone) => {
                return Err(format!(
                    "linux.namespaces: joining the {} namespace at {} is not supported (the container has its own VM)",
                    ns.typ(),
                    path.display()
                ))
            }
        }
    }
    Ok(out)
}

fn id_mappings(list: &Option<Vec<LinuxIdMapping>>) -> Vec<IdMapping> {
    list.iter()
        .flatten()
        .map(|m| IdMapping {
            container_id: m.container_id(),
            host_id: m.host_id(),
            size: m.size(),
        })
        .collect()
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn test_memory_policy_accepted_with_valid_nodes_only() {
        for ok in ["", "0", "0-3,7", "1,2"] {
            assert!(memory_policy_nodes(ok).is_ok(), "{ok}");
        }
        for bad in ["x", "3-1", "0,", "-1", "0-", "1024", "0,,1"] {
            assert!(memory_policy_nodes(bad).is_err(), "{bad}");
        }
        let linux: Linux = serde_json::from_value(serde_json::json!({
            "memoryPolicy": {"mode": "MPOL_BIND", "nodes": "0", "flags": ["MPOL_F_STATIC_NODES"]}
        }))
        .unwrap();
        assert!(refuse_unsupported(&linux).is_ok());
        let bad: Result<Linux, _> = serde_json::from_value(serde_json::json!({
            "memoryPolicy": {"mode": "MPOL_NOPE"}
        }));
        assert!(
            bad.is_err(),
            "an unknown mode is refused when config.json is read"
        );
    }

    #[test]
    fn test_attrs_default_spec_mounts_converted() {
        let a = attrs(&Spec::default(), Path::new("/"), PodRole::Alone).unwrap();
        let dests: Vec<&str> = a.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup"
            ]
        );
        assert_eq!(a.mounts[6].kind, MountKind::Cgroup2);
        assert_eq!(a.mounts[1].data, ["mode=755", "size=65536k"]);
        assert!(a.masked_paths.contains(&"/proc/kcore".to_owned()));
        assert!(a.readonly_paths.contains(&"/proc/sys".to_owned()));
    }

    #[test]
    fn test_mount_options_later_wins_and_data_kept() {
        let (flags, data, _) = mount_options(&opts(&["ro", "nosuid", "rw", "size=1m"])).unwrap();
        assert_eq!(flags, [MountFlag::Nosuid]);
        assert_eq!(data, ["size=1m"]);
        assert!(mount_options(&opts(&["remount"])).is_err());
    }

    #[test]
    fn test_mount_options_recursive_as_runc() {
        type A = RecursiveAttrs;
        let (flags, _, r) = mount_options(&opts(&["rro", "nosuid", "rrw", "rnoatime"])).unwrap();
        assert_eq!(flags, [MountFlag::Nosuid]);
        // `rrw` after `rro` clears and sets: the kernel sets last, read-only stays (runc).
        assert_eq!(r.set, A::RDONLY | A::NOATIME);
        assert_eq!(r.clear, A::RDONLY | A::ATIME);
        let (_, _, r) = mount_options(&opts(&["rrelatime", "rsymfollow"])).unwrap();
        assert_eq!((r.set, r.clear), (0, A::ATIME | A::NOSYMFOLLOW));
    }

    #[test]
    fn test_mount_bind_missing_source_and_unknown_type_rejected() {
        let mut binds = BindShares::new(Path::new("/"));
        let mut m = OciMount::default();
        m.set_destination("/data".into());
        m.set_typ(Some("bind".into()));
        m.set_source(Some("/no/such/dir".into()));
        assert!(mount(&m, &mut binds).unwrap_err().contains("/no/such/dir"));
        m.set_source(Some("/tmp".into()));
        m.set_options(Some(vec!["rbind".into(), "ro".into()]));
        let bind = mount(&m, &mut binds).unwrap();
        assert_eq!(
            (bind.kind, bind.flags),
            (MountKind::Bind, vec![MountFlag::Ro])
        );
        m.set_typ(Some("overlay".into()));
        m.set_options(None);
        assert!(mount(&m, &mut binds).unwrap_err().contains("not supported"));
    }
}
