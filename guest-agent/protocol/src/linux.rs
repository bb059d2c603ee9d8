//! The container's file system view and kernel parameters in a [`crate::ContainerSpec`]:
//! kernel file system mounts (config.md `mounts`), `linux.maskedPaths`,
//! `linux.readonlyPaths` and `linux.sysctl` (config-linux.md), with their checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A kernel file system, or a bind mount of a host path shared with virtio-fs, mounted into
/// the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the container.
    pub destination: String,
    /// The file system.
    pub kind: MountKind,
    /// Generic mount flags.
    #[serde(default)]
    pub flags: Vec<MountFlag>,
    /// File-system-specific options (`size=65536k`, `mode=755`, `newinstance`, ...), joined
    /// with `,` for mount(2); none for a bind mount.
    #[serde(default)]
    pub data: Vec<String>,
    /// What a [`MountKind::Bind`] mount binds; `None` for every other kind.
    #[serde(default)]
    pub source: Option<BindSource>,
    /// The device name a kernel file system is mounted with (config.json's `source`: `proc`,
    /// `shm`, `devpts`, ...), which /proc/self/mountinfo shows; `None`: the type's name.
    /// Never set on a bind mount.
    #[serde(default)]
    pub device: Option<String>,
    /// Attributes set or cleared on the mount and every mount below it (version 7).
    #[serde(default)]
    pub recursive: RecursiveAttrs,
}

/// Mount attributes set or cleared on a mount and every mount below it, as mount_setattr(2)
/// with `AT_RECURSIVE` takes them (`MOUNT_ATTR_*` bits): the OCI options `rro`, `rnosuid`,
/// `rnoatime`, ... Setting an access-time mode clears the others (`MOUNT_ATTR__ATIME`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecursiveAttrs {
    /// Attributes to set.
    #[serde(default)]
    pub set: u64,
    /// Attributes to clear.
    #[serde(default)]
    pub clear: u64,
}

impl RecursiveAttrs {
    /// `MOUNT_ATTR_RDONLY`.
    pub const RDONLY: u64 = 0x1;
    /// `MOUNT_ATTR_NOSUID`.
    pub const NOSUID: u64 = 0x2;
    /// `MOUNT_ATTR_NODEV`.
    pub const NODEV: u64 = 0x4;
    /// `MOUNT_ATTR_NOEXEC`.
    pub const NOEXEC: u64 = 0x8;
    /// `MOUNT_ATTR__ATIME`: the access-time mode's bits.
    pub const ATIME: u64 = 0x70;
    /// `MOUNT_ATTR_RELATIME` (the mode 0).
    pub const RELATIME: u64 = 0x0;
    /// `MOUNT_ATTR_NOATIME`.
    pub const NOATIME: u64 = 0x10;
    /// `MOUNT_ATTR_STRICTATIME`.
    pub const STRICTATIME: u64 = 0x20;
    /// `MOUNT_ATTR_NODIRATIME`.
    pub const NODIRATIME: u64 = 0x80;
    /// `MOUNT_ATTR_NOSYMFOLLOW`.
    pub const NOSYMFOLLOW: u64 = 0x0020_0000;
    const KNOWN: u64 = Self::RDONLY
        | Self::NOSUID
        | Self::NODEV
        | Self::NOEXEC
        | Self::ATIME
        | Self::NODIRATIME
        | Self::NOSYMFOLLOW;

    /// Nothing to set or clear.
    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clear == 0
    }

    fn validate(&self) -> Result<(), String> {
        match (self.set | self.clear) & !Self::KNOWN {
            0 => Ok(()),
            unknown => Err(format!("unknown recursive mount attributes {unknown:#x}")),
        }
    }
}

/// The source of a bind mount: a directory inside a virtio-fs share (a host directory's share
/// holds it alone, under its name, so that the bind's root in mountinfo is that name), the
/// share's root, or one file in either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindSource {
    /// virtio-fs tag of the share: 1 to 36 bytes of `[A-Za-z0-9_-]`.
    pub tag: String,
    /// A directory inside the share to bind instead of the share's root, relative to it (see
    /// [`validate_share_path`]; version 4).
    #[serde(default)]
    pub path: Option<String>,
    /// A file name in the shared directory (or in [`BindSource::path`]) to bind instead of the
    /// directory itself.
    #[serde(default)]
    pub file: Option<String>,
}

impl BindSource {
    fn validate(&self) -> Result<(), String> {
        let tag_ok = (1..=36).contains(&self.tag.len())
            && self
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        let file_ok = self.file.as_deref().is_none_or(|f| {
            !f.is_empty() && f.len() <= 255 && f != "." && f != ".." && !f.contains(['/', '\0'])
        });
        if !(tag_ok && file_ok) {
            return Err(format!("invalid bind source {self:?}"));
        }
        match &self.path {
            Some(path) => validate_share_path("bind source path", path),
            None => Ok(()),
        }
    }
}

/// Longest directory path inside a virtio-fs share (PATH_MAX).
const MAX_SHARE_PATH_LEN: usize = 4096;

/// Checks a directory path inside a virtio-fs share ([`BindSource::path`],
/// [`crate::Rootfs::VirtioFs`]'s `path`): relative, 1 to 4096 bytes, no NUL, every
/// `/`-separated component non-empty and neither `.` nor `..` (so it cannot leave the share).
pub(crate) fn validate_share_path(what: &str, path: &str) -> Result<(), String> {
    let ok = (1..=MAX_SHARE_PATH_LEN).contains(&path.len())
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{what} {path:?} must be a relative path of 1 to {MAX_SHARE_PATH_LEN} bytes without empty, . or .. components"
        )),
    }
}

/// File systems a container may mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// procfs of the container's pid namespace.
    Proc,
    /// sysfs of the container's network namespace.
    Sysfs,
    /// A fresh tmpfs.
    Tmpfs,
    /// A new devpts instance.
    Devpts,
    /// POSIX message queues of the container's IPC namespace.
    Mqueue,
    /// The cgroup v2 hierarchy (config.json's `cgroup` type too: the guest is cgroup v2 only).
    Cgroup2,
    /// A bind mount of [`Mount::source`].
    Bind,
}

impl MountKind {
    /// The file system type name for mount(2).
    pub fn fstype(self) -> &'static str {
        match self {
            Self::Proc => "proc",
            Self::Sysfs => "sysfs",
            Self::Tmpfs => "tmpfs",
            Self::Devpts => "devpts",
            Self::Mqueue => "mqueue",
            Self::Cgroup2 => "cgroup2",
            Self::Bind => "bind",
        }
    }
}

/// Generic mount flags (mount(2) `MS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountFlag {
    /// `MS_RDONLY`.
    Ro,
    /// `MS_NOSUID`.
    Nosuid,
    /// `MS_NODEV`.
    Nodev,
    /// `MS_NOEXEC`.
    Noexec,
    /// `MS_SYNCHRONOUS`.
    Sync,
    /// `MS_DIRSYNC`.
    Dirsync,
    /// `MS_NOATIME`.
    Noatime,
    /// `MS_NODIRATIME`.
    Nodiratime,
    /// `MS_RELATIME`.
    Relatime,
    /// `MS_STRICTATIME`.
    Strictatime,
    /// runc's `tmpcopyup` (no mount(2) flag): a tmpfs starts with a copy of what its mount
    /// point held (Podman sets it on the tmpfs mounts of `--read-only` and `--tmpfs`).
    TmpCopyUp,
}

/// Propagation type of a mount (mount_namespaces(7)), `linux.rootfsPropagation`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    /// `MS_SHARED`.
    Shared,
    /// `MS_SLAVE`.
    Slave,
    /// `MS_PRIVATE`.
    Private,
    /// `MS_UNBINDABLE`.
    Unbindable,
}

/// The propagation the container's root mount gets once entered (`linux.rootfsPropagation`:
/// `shared`, `rshared`, ...), set as runc does, after `pivot_root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RootPropagation {
    /// The type.
    pub kind: Propagation,
    /// Also every mount below the root (the `r` forms).
    pub recursive: bool,
}

impl RootPropagation {
    /// Parses a `linux.rootfsPropagation` value; `None` for an unknown one.
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let (recursive, name) = match value.strip_prefix('r') {
            Some(rest) if rest != "ivate" => (true, rest),
            _ => (false, value),
        };
        let kind = match name {
            "shared" => Propagation::Shared,
            "slave" => Propagation::Slave,
            "private" => Propagation::Private,
            "unbindable" => Propagation::Unbindable,
            _ => return None,
        };
        Some(Self { kind, recursive })
    }
}

/// A namespace the container gets its own of (namespaces(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// Process ids: the container's process is PID 1.
    Pid,
    /// Network stack (loopback only in the guest).
    Net,
    /// SysV IPC and POSIX message queues.
    Ipc,
    /// Hostname and domain name.
    Uts,
    /// Mount table; required (the agent builds the container's root in it).
    Mount,
    /// cgroup root: the container sees its own cgroup as `/`.
    Cgroup,
    /// User and group ids, with the spec's id mappings.
    User,
}

/// A namespace of another container of the same VM that a container enters (setns(2))
/// instead of getting its own: how the containers of a pod share the sandbox's network, IPC
/// and UTS namespaces (version 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinNamespace {
    /// Which namespace: [`Namespace::Net`], [`Namespace::Ipc`], [`Namespace::Uts`],
    /// [`Namespace::Pid`] or [`Namespace::Cgroup`] (user and mount cannot be joined).
    pub kind: Namespace,
    /// Id of the container whose first process's namespace is entered; it must have been
    /// created in this VM and not have exited.
    pub container: String,
}

/// One line of a user namespace's `uid_map` or `gid_map` (user_namespaces(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    /// First id inside the container.
    pub container_id: u32,
    /// First id in the guest it maps to.
    pub host_id: u32,
    /// How many ids; at least 1.
    pub size: u32,
}

/// Most lines a `uid_map`/`gid_map` may have (user_namespaces(7), since Linux 4.15).
const MAX_ID_MAPPINGS: usize = 340;

/// Checks id mappings: present exactly when there is a user namespace, 1 to 340 lines, no
/// empty or overflowing range.
pub(crate) fn validate_id_mappings(
    what: &str,
    mappings: &[IdMapping],
    user_ns: bool,
) -> Result<(), String> {
    match (user_ns, mappings.is_empty()) {
        (true, true) => return Err(format!("a user namespace needs {what}")),
        (false, false) => return Err(format!("{what} need a user namespace")),
        _ => {}
    }
    if mappings.len() > MAX_ID_MAPPINGS {
        return Err(format!("{what}: more than {MAX_ID_MAPPINGS} mappings"));
    }
    for m in mappings {
        let fits = |start: u32| start.checked_add(m.size).is_some();
        if m.size == 0 || !fits(m.container_id) || !fits(m.host_id) {
            return Err(format!("{what}: invalid mapping {m:?}"));
        }
    }
    Ok(())
}

/// Checks the namespace list: each at most once, and a mount namespace (the agent must not
/// build the container's root in its own mount table).
pub(crate) fn validate_namespaces(namespaces: &[Namespace]) -> Result<(), String> {
    for (i, ns) in namespaces.iter().enumerate() {
        if namespaces.iter().skip(i + 1).any(|o| o == ns) {
            return Err(format!("namespace {ns:?} is listed twice"));
        }
    }
    if !namespaces.contains(&Namespace::Mount) {
        return Err("linux.namespaces must include a mount namespace".into());
    }
    Ok(())
}

/// Checks the namespaces to join: a valid container id each, at most one entry per kind,
/// none also in `namespaces` (the container's own), and neither user nor mount.
pub(crate) fn validate_join_namespaces(
    joins: &[JoinNamespace],
    namespaces: &[Namespace],
) -> Result<(), String> {
    for (i, join) in joins.iter().enumerate() {
        let kind = join.kind;
        crate::validate_id(&join.container)
            .map_err(|e| format!("join_namespaces {kind:?}: {e}"))?;
        if matches!(kind, Namespace::User | Namespace::Mount) {
            return Err(format!("joining a {kind:?} namespace is not supported"));
        }
        if namespaces.contains(&kind) {
            return Err(format!(
                "namespace {kind:?} is both the container's own and joined"
            ));
        }
        if joins.iter().skip(i + 1).any(|o| o.kind == kind) {
            return Err(format!("namespace {kind:?} is joined twice"));
        }
    }
    Ok(())
}

/// Longest path accepted in a mount, masked or read-only path (PATH_MAX).
const MAX_PATH_LEN: usize = 4096;
/// Longest single file-system-specific option.
const MAX_DATA_LEN: usize = 256;

/// Checks an absolute path inside the container: `/`-led, no `.`/`..` components, no NUL.
pub(crate) fn validate_container_path(what: &str, path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() <= MAX_PATH_LEN
        && !path.contains('\0')
        && path.split('/').all(|c| c != "." && c != "..");
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{what} {path:?} must be an absolute path without . or .. components"
        )),
    }
}

impl Mount {
    pub(crate) fn validate(&self) -> Result<(), String> {
        validate_container_path("mount destination", &self.destination)?;
        self.recursive.validate()?;
        if self.destination.trim_end_matches('/').is_empty() {
            return Err("a mount cannot replace the root directory".into());
        }
        match (&self.kind, &self.source) {
            (MountKind::Bind, Some(source)) if self.data.is_empty() => source.validate()?,
            (MountKind::Bind, _) => {
                return Err(format!(
                    "bind mount {}: needs a source and no options",
                    self.destination
                ))
            }
            (_, Some(_)) => {
                return Err(format!(
                    "mount {}: only a bind mount has a source",
                    self.destination
                ))
            }
            (_, None) => {}
        }
        if let Some(device) = &self.device {
            if self.kind == MountKind::Bind
                || device.is_empty()
                || device.len() > MAX_DATA_LEN
                || device.contains('\0')
            {
                return Err(format!(
                    "mount {}: bad source {device:?} (1 to {MAX_DATA_LEN} bytes, no NUL, not on a bind mount)",
                    self.destination
                ));
            }
        }
        let bad = self
            .data
            .iter()
            .find(|d| d.is_empty() || d.len() > MAX_DATA_LEN || d.contains([',', '\0']));
        match bad {
            Some(d) => Err(format!("mount {}: invalid option {d:?}", self.destination)),
            None => Ok(()),
        }
    }
}

/// A device node config.json asks for (`linux.devices`), made in the container's root
/// before it is entered. Its numbers name the guest kernel's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Absolute path inside the container.
    pub path: String,
    /// Node type.
    pub kind: DeviceKind,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Permission bits (at most `0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// What kind of node a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A character device (`c`, `u`).
    Char,
    /// A block device (`b`).
    Block,
    /// A FIFO (`p`).
    Fifo,
}

impl Device {
    pub(crate) fn validate(&self) -> Result<(), String> {
        validate_container_path("device path", &self.path)?;
        if self.mode > 0o7777 {
            return Err(format!(
                "device {}: mode {:o} is not a permission mode",
                self.path, self.mode
            ));
        }
        if self.major > 0xfff || self.minor > 0xf_ffff {
            return Err(format!(
                "device {}: numbers {}:{} out of range",
                self.path, self.major, self.minor
            ));
        }
        Ok(())
    }
}

/// Namespaces a sysctl can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    /// `net.*`.
    Net,
    /// SysV IPC and POSIX message queue limits.
    Ipc,
    /// `kernel.hostname`, `kernel.domainname`.
    Uts,
}

/// IPC sysctls outside `fs.mqueue.` (ipc_namespaces(7)), as runc's allow list.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// The namespace a sysctl belongs to, or `None` for one that would change the whole guest
/// kernel (refused, as runc refuses sysctls that are not namespaced).
pub fn sysctl_namespace(key: &str) -> Option<SysctlNamespace> {
    if key.starts_with("net.") {
        Some(SysctlNamespace::Net)
    } else if key.starts_with("fs.mqueue.") || IPC_SYSCTLS.contains(&key) {
        Some(SysctlNamespace::Ipc)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(SysctlNamespace::Uts)
    } else {
        None
    }
}

/// Checks sysctl keys (`[A-Za-z0-9_-]` words joined by `.` or `/`, namespaced) and values
/// (no NUL); `has_ns` says whether the container gets its own namespace of a kind.
pub(crate) fn validate_sysctls(
    sysctl: &BTreeMap<String, String>,
    has_ns: impl Fn(SysctlNamespace) -> bool,
) -> Result<(), String> {
    for (key, value) in sysctl {
        let well_formed = key.len() <= 256
            && key.split(['.', '/']).all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            });
        if !well_formed || value.contains('\0') {
            return Err(format!("invalid sysctl {key:?}={value:?}"));
        }
        match sysctl_namespace(key) {
            Some(ns) if has_ns(ns) => {}
            Some(ns) => {
                return Err(format!(
                    "sysctl {key:?} needs the container's own {ns:?} namespace"
                ))
            }
            None => {
                return Err(format!(
                    "sysctl {key:?} is not in a separate kernel namespace"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_root_propagation_parses_the_eight_forms() {
        use super::{Propagation, RootPropagation};
        let p = |v| RootPropagation::parse(v).map(|r| (r.kind, r.recursive));
        assert_eq!(p("shared"), Some((Propagation::Shared, false)));
        assert_eq!(p("rshared"), Some((Propagation::Shared, true)));
        assert_eq!(p("private"), Some((Propagation::Private, false)));
        assert_eq!(p("rprivate"), Some((Propagation::Private, true)));
        assert_eq!(p("rslave"), Some((Propagation::Slave, true)));
        assert_eq!(p("runbindable"), Some((Propagation::Unbindable, true)));
        assert_eq!(p("unbindable"), Some((Propagation::Unbindable, false)));
        for bad in ["", "r", "rr", "Shared", "rivate", "rrshared"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn test_validate_container_path_dotdot_relative_nul_rejected() {
        for bad in ["proc", "/proc/../etc", "/./x", "/a\0b", ""] {
            assert!(validate_container_path("p", bad).is_err(), "{bad:?}");
        }
        assert!(validate_container_path("p", "/proc/kcore").is_ok());
    }

    #[test]
    fn test_mount_validate_root_or_comma_option_rejected() {
        let mut m = Mount {
            destination: "/dev".into(),
            kind: MountKind::Tmpfs,
            flags: vec![MountFlag::Nosuid],
            data: vec!["size=1m".into()],
            source: None,
            device: None,
            recursive: Default::default(),
        };
        assert!(m.validate().is_ok());
        m.data.push("mode=1,uid=0".into());
        assert!(m.validate().is_err());
        m.data.clear();
        m.destination = "/".into();
        assert!(m.validate().is_err());
    }

    #[test]
    fn test_mount_validate_bind_source_checked() {
        let mut m = Mount {
            destination: "/data".into(),
            kind: MountKind::Bind,
            flags: vec![MountFlag::Ro],
            data: vec![],
            source: Some(BindSource {
                tag: "bind0".into(),
                path: None,
                file: Some("greeting".into()),
            }),
            device: None,
            recursive: Default::default(),
        };
        assert!(m.validate().is_ok());
        for (tag, file) in [
            ("bind0", Some("../etc")),
            ("bind0", Some("a/b")),
            ("", None),
        ] {
            m.source = Some(BindSource {
                tag: tag.into(),
                path: None,
                file: file.map(Into::into),
            });
            assert!(m.validate().is_err(), "{tag:?} {file:?}");
        }
        m.source = None;
        assert!(m.validate().is_err(), "bind without a source");
    }

    #[test]
    fn test_validate_share_path_relative_paths_accepted() {
        for good in ["a", "pod/c1/rootfs", "..a/b..", ".x", &"x".repeat(4096)] {
            assert!(validate_share_path("p", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn test_validate_share_path_escapes_and_bad_forms_rejected() {
        let long = "x".repeat(4097);
        for bad in [
            "", "/abs", "a/", "a//b", ".", "..", "a/./b", "a/../b", "../a", "a/..", "a\0b", &long,
        ] {
            assert!(validate_share_path("p", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_bind_source_validate_path_checked() {
        let mut source = BindSource {
            tag: "bind0".into(),
            path: Some("pod/c1/volumes/data".into()),
            file: Some("greeting".into()),
        };
        assert!(source.validate().is_ok());
        for bad in ["/pod", "pod/../etc", "pod//c1", ""] {
            source.path = Some(bad.into());
            assert!(source.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_bind_source_json_without_path_decodes_to_none() {
        let source: BindSource = serde_json::from_str(r#"{"tag":"bind0","file":"f"}"#).unwrap();
        assert_eq!(source.path, None);
    }

    fn join(kind: Namespace, container: &str) -> JoinNamespace {
        JoinNamespace {
            kind,
            container: container.into(),
        }
    }

    #[test]
    fn test_validate_join_namespaces_pod_namespaces_accepted() {
        let own = [Namespace::Mount, Namespace::Pid];
        let joins: Vec<_> = [
            Namespace::Net,
            Namespace::Ipc,
            Namespace::Uts,
            Namespace::Cgroup,
        ]
        .into_iter()
        .map(|kind| join(kind, "sandbox-1"))
        .collect();
        assert!(validate_join_namespaces(&joins, &own).is_ok());
        assert!(
            validate_join_namespaces(&[join(Namespace::Pid, "s")], &[Namespace::Mount]).is_ok()
        );
    }

    #[test]
    fn test_validate_join_namespaces_user_or_mount_rejected() {
        for kind in [Namespace::User, Namespace::Mount] {
            let err = validate_join_namespaces(&[join(kind, "sandbox")], &[]).unwrap_err();
            assert!(err.contains("not supported"), "{err}");
        }
    }

    #[test]
    fn test_validate_join_namespaces_also_own_rejected() {
        let own = [Namespace::Mount, Namespace::Net];
        assert!(validate_join_namespaces(&[join(Namespace::Net, "sandbox")], &own).is_err());
    }

    #[test]
    fn test_validate_join_namespaces_kind_twice_rejected() {
        let joins = [join(Namespace::Ipc, "a"), join(Namespace::Ipc, "b")];
        assert!(validate_join_namespaces(&joins, &[Namespace::Mount]).is_err());
    }

    #[test]
    fn test_validate_join_namespaces_bad_container_id_rejected() {
        for id in ["", "..", "a/b", ".hidden"] {
            let joins = [join(Namespace::Net, id)];
            assert!(
                validate_join_namespaces(&joins, &[Namespace::Mount]).is_err(),
                "{id:?}"
            );
        }
    }

    #[test]
    fn test_validate_sysctls_non_namespaced_rejected() {
        let all = |_| true;
        let one = |k: &str| BTreeMap::from([(k.to_owned(), "1".to_owned())]);
        assert!(validate_sysctls(&one("net.ipv4.ip_forward"), all).is_ok());
        assert!(validate_sysctls(&one("kernel.shmmax"), all).is_ok());
        assert!(validate_sysctls(&one("fs.mqueue.msg_max"), all).is_ok());
        for bad in ["vm.swappiness", "kernel.panic", "net..x", "net.a/../b"] {
            assert!(validate_sysctls(&one(bad), all).is_err(), "{bad}");
        }
        let no_net = |ns| ns != SysctlNamespace::Net;
        assert!(validate_sysctls(&one("net.ipv4.ip_forward"), no_net).is_err());
    }
}
