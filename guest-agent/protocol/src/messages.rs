//! Messages of the protocol. JSON with an internal `type` tag; unknown fields are ignored so
//! that a newer peer can add optional fields without a version bump.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::linux::{
    validate_container_path, validate_id_mappings, validate_join_namespaces, validate_namespaces,
    validate_share_path, validate_sysctls, IdMapping, JoinNamespace, Mount, Namespace,
    SysctlNamespace,
};
use crate::network::Network;
use crate::process::{validate_rlimits, Capabilities, Rlimit, OOM_SCORE_ADJ_RANGE};
use crate::resources::Resources;
use crate::seccomp::Seccomp;

/// Version of the protocol spoken by this crate; both sides must agree exactly.
pub const PROTOCOL_VERSION: u32 = 9;

/// vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on which a connection asks the agent to ready its guest to be saved as a boot
/// snapshot: it gives the guest's free memory back as zeros (pages a snapshot leaves out, and
/// a VM restored from it neither copies nor holds), then closes the connection. No message
/// crosses it.
pub const SAVE_PORT: u32 = 1025;

/// A request from the host; the first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Opens a control connection; answered by [`Response::Hello`] or a version error.
    Hello {
        /// [`PROTOCOL_VERSION`] of the host.
        version: u32,
    },
    /// Builds the container's namespaces and rootfs; its process waits for `StartContainer`.
    CreateContainer {
        /// What to build (boxed: it is by far the largest request).
        spec: Box<ContainerSpec>,
    },
    /// Lets the created container's process exec; answered by [`Response::Started`].
    StartContainer {
        /// Container id.
        id: String,
    },
    /// Answered by [`Response::Exited`] once the process exited and its output was delivered.
    WaitContainer {
        /// Container id.
        id: String,
    },
    /// Sends a signal to the container's process.
    SignalContainer {
        /// Container id.
        id: String,
        /// Signal number (0..=64; 0 checks that the process exists).
        signal: i32,
        /// To every process of the container, not only its first.
        #[serde(default)]
        all: bool,
    },
    /// Turns the connection into the raw byte stream of one of the container's stdio streams
    /// (or of one of its exec processes').
    AttachStdio {
        /// Container id.
        id: String,
        /// Which stream.
        stream: StdioStream,
        /// The exec process, if not the container's own.
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Runs another process in the running container's namespaces; answered by
    /// [`Response::Started`]. Its stdio is attached like the container's, with `exec_id`.
    ExecProcess {
        /// Container id.
        id: String,
        /// The host's name for this process: 1..=128 of `[A-Za-z0-9_.-]`, unique in the
        /// container.
        exec_id: String,
        /// What to run.
        process: ProcessSpec,
        /// Nobody will attach: stdin is closed and output discarded.
        #[serde(default)]
        detach: bool,
    },
    /// Answered by [`Response::Exited`] once the exec process exited and its output was
    /// delivered.
    WaitProcess {
        /// Container id.
        id: String,
        /// Exec process.
        exec_id: String,
    },
    /// Sends a signal to an exec process.
    SignalProcess {
        /// Container id.
        id: String,
        /// Exec process.
        exec_id: String,
        /// Signal number (0..=64).
        signal: i32,
    },
    /// Freezes every process of the container (its cgroup).
    PauseContainer {
        /// Container id.
        id: String,
    },
    /// Thaws a paused container.
    ResumeContainer {
        /// Container id.
        id: String,
    },
    /// Changes the container's cgroup limits (the fields set; the others stay).
    UpdateContainer {
        /// Container id.
        id: String,
        /// The new limits.
        resources: Resources,
    },
    /// Answered by [`Response::Stats`]: the container's cgroup counters.
    ContainerStats {
        /// Container id.
        id: String,
    },
    /// Sets the window size of the container's (or an exec process's) terminal.
    ResizeTerminal {
        /// Container id.
        id: String,
        /// The exec process, if not the container's own.
        #[serde(default)]
        exec_id: Option<String>,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Answered by [`Response::Processes`]: every process of the container.
    ListProcesses {
        /// Container id.
        id: String,
    },
    /// Gives the VM's network device the pod's network (before the pod's first container,
    /// which shares the agent's network namespace then; version 5).
    ConfigureNetwork {
        /// The pod's interface.
        network: Network,
    },
    /// Forgets a container whose process exited and was waited for (and its exec processes),
    /// so that its id can be used again in this VM (version 5). A pod's VM outlives its
    /// containers.
    DeleteContainer {
        /// Container id.
        id: String,
    },
    /// Gives the guest its own entropy and the host's time, before any container (version
    /// 9; see [`crate::GuestIdentity`]).
    SetIdentity {
        /// What the host gives.
        identity: crate::GuestIdentity,
    },
    /// Syncs file systems and powers the VM off.
    Shutdown,
}

/// A reply of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Handshake answer.
    Hello {
        /// [`PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// Agent build, for logs.
        agent: String,
    },
    /// The request succeeded and has nothing to return.
    Ok,
    /// The container's process is running.
    Started {
        /// Its pid as seen from the agent.
        pid: u32,
    },
    /// The container's process exited and all of its output was delivered.
    Exited {
        /// Exit code, or 128 + N when killed by signal N.
        code: i32,
        /// The kernel's OOM killer killed a process of the container (its cgroup's
        /// `memory.events` counted an `oom_kill`; version 3).
        #[serde(default)]
        oom_killed: bool,
    },
    /// A container's cgroup counters.
    Stats {
        /// The counters.
        stats: Stats,
    },
    /// The processes of a container.
    Processes {
        /// In pid order.
        processes: Vec<ProcessInfo>,
    },
    /// The request failed.
    Error {
        /// What kind of failure, for callers to branch on.
        kind: ErrorKind,
        /// One line for humans.
        message: String,
    },
}

/// Kinds of [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// No container with that id.
    NotFound,
    /// A container with that id exists already.
    AlreadyExists,
    /// The operation does not fit the container's state.
    InvalidState,
    /// The request is malformed or names invalid values.
    InvalidRequest,
    /// The container's process could not be executed.
    ExecFailed,
    /// Anything else.
    Internal,
}

/// One stdio stream of a container's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdioStream {
    /// Host -> process.
    Stdin,
    /// Process -> host.
    Stdout,
    /// Process -> host.
    Stderr,
}

/// Everything the agent needs to build one container; the host turns config.json into this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Container id: 1..=128 characters of `[A-Za-z0-9_.-]`, not starting with `.`.
    pub id: String,
    /// Where the rootfs comes from.
    pub rootfs: Rootfs,
    /// Mount the rootfs read-only.
    pub rootfs_readonly: bool,
    /// Propagation of the root mount once entered; `None` leaves it private.
    #[serde(default)]
    pub rootfs_propagation: Option<crate::RootPropagation>,
    /// Hostname of the container's UTS namespace; needs its own or a joined one (a joined one
    /// keeps its hostname: the agent does not set it again).
    pub hostname: Option<String>,
    /// argv of the process; never empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    /// Absolute working directory inside the rootfs.
    pub cwd: String,
    /// Credentials of the process.
    pub user: User,
    /// Resource limits set before exec (version 3).
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// Set `no_new_privs` before exec (version 3).
    #[serde(default)]
    pub no_new_privileges: bool,
    /// The process's `oom_score_adj`, -1000..=1000 (version 3).
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// The process's capability sets; `None` leaves root's full set (version 3).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Kernel file systems to mount, in order, before the root is entered (version 3).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Device nodes made after the mounts, before the root is entered (`linux.devices`).
    #[serde(default)]
    pub devices: Vec<crate::Device>,
    /// Paths hidden from the process: `/dev/null` over files, an empty read-only tmpfs over
    /// directories (version 3).
    #[serde(default)]
    pub masked_paths: Vec<String>,
    /// Paths made read-only (version 3).
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// Namespaced kernel parameters, `net.ipv4.ip_forward` -> `1` (version 3).
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    /// Namespaces the container gets its own of (version 3).
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// Namespaces of other containers of this VM the container enters instead of getting its
    /// own: net, ipc, uts, pid or cgroup, each at most once and not also in
    /// [`ContainerSpec::namespaces`] (version 4).
    #[serde(default)]
    pub join_namespaces: Vec<JoinNamespace>,
    /// The VM's network is the container's own: it joined the network namespace an engine made
    /// for it on the host, which the VM's device carries, so it stays in the guest's and its
    /// `net.*` sysctls apply there.
    #[serde(default)]
    pub vm_network: bool,
    /// The execution domain the process runs in (`linux.personality`; version 7); `None`
    /// keeps the agent's (Linux).
    #[serde(default)]
    pub personality: Option<Personality>,
    /// uid_map of the user namespace (only with [`Namespace::User`]; version 3).
    #[serde(default)]
    pub uid_mappings: Vec<IdMapping>,
    /// gid_map of the user namespace (only with [`Namespace::User`]; version 3).
    #[serde(default)]
    pub gid_mappings: Vec<IdMapping>,
    /// cgroup v2 limits of the container's cgroup (version 3).
    #[serde(default)]
    pub resources: Resources,
    /// The process gets a pseudo-terminal as stdin, stdout and stderr (and controlling
    /// terminal); its stdout stream carries the terminal's output, there is no stderr stream.
    #[serde(default)]
    pub terminal: bool,
    /// seccomp profile installed right before exec (version 3).
    #[serde(default)]
    pub seccomp: Option<Seccomp>,
    /// `createContainer` and `startContainer` hooks, run by the agent in the container's
    /// namespaces (version 8).
    #[serde(default)]
    pub hooks: crate::GuestHooks,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rootfs {
    /// A virtio-fs share: a host directory, or a directory inside it.
    VirtioFs {
        /// The share's tag: 1 to 36 bytes.
        tag: String,
        /// A directory inside the share to use as the rootfs instead of the share's root:
        /// relative, 1 to 4096 bytes, no empty, `.` or `..` component (version 4).
        #[serde(default)]
        path: Option<String>,
    },
    /// The ext4 filesystem on the virtio-blk disk whose serial (its GET_ID string) is
    /// `serial`: a raw disk image on the host.
    Block {
        /// 1 to 20 characters of `[A-Za-z0-9_-]` (the virtio-blk id is 20 bytes).
        serial: String,
    },
}

impl Rootfs {
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::VirtioFs { tag, .. }
                if tag.is_empty() || tag.len() > 36 || tag.contains('\0') =>
            {
                Err(format!("invalid virtio-fs tag {tag:?}"))
            }
            Self::VirtioFs {
                path: Some(path), ..
            } => validate_share_path("rootfs path", path),
            Self::Block { serial } if !valid_serial(serial) => {
                Err(format!("invalid virtio-blk serial {serial:?}"))
            }
            _ => Ok(()),
        }
    }
}

/// Whether `serial` can name a virtio-blk disk: 1 to 20 characters of `[A-Za-z0-9_-]`.
pub fn valid_serial(serial: &str) -> bool {
    (1..=20).contains(&serial.len())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// An execution domain (personality(2)), as runc takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Personality {
    /// `PER_LINUX`.
    Linux,
    /// `PER_LINUX32`: `uname -m` says i686 on x86_64.
    Linux32,
}

/// A process to run in an existing container (exec). Its limits and privileges are applied
/// as the container's first process's ([`ContainerSpec`]); its `oom_score_adj` is the
/// container's (runc ignores an exec process's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// argv; never empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    /// Absolute working directory inside the container.
    pub cwd: String,
    /// Credentials.
    pub user: User,
    /// A pseudo-terminal, as [`ContainerSpec::terminal`].
    #[serde(default)]
    pub terminal: bool,
    /// Resource limits set before exec; none keeps the agent's (version 6).
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// Set `no_new_privs` before exec (version 6).
    #[serde(default)]
    pub no_new_privileges: bool,
    /// The process's capability sets; `None` gives it the container's first process's sets,
    /// as runc (version 6).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// The terminal's window size (rows, columns) before the process runs (OCI
    /// `process.consoleSize`); `None` leaves it to the first resize.
    #[serde(default)]
    pub console_size: Option<(u16, u16)>,
}

impl ProcessSpec {
    /// Checks the fields a hostile or buggy peer could get wrong.
    ///
    /// # Errors
    /// A one-line description of the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        validate_process(&self.args, &self.env, &self.cwd)?;
        self.user.validate()?;
        validate_privileges(&self.rlimits, None, self.capabilities.as_ref())
    }
}

/// A container's cgroup counters (cgroup v2 files in the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `cpu.stat` usage_usec.
    pub cpu_usage_usec: u64,
    /// `cpu.stat` user_usec.
    pub cpu_user_usec: u64,
    /// `cpu.stat` system_usec.
    pub cpu_system_usec: u64,
    /// `memory.current` in bytes.
    pub memory_current: u64,
    /// `memory.max` in bytes (`None`: no limit).
    pub memory_max: Option<u64>,
    /// `memory.events` oom_kill.
    pub oom_kills: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `pids.max` (`None`: no limit).
    pub pids_max: Option<u64>,
}

/// One process of a container, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid in the guest (the agent's pid namespace).
    pub pid: u32,
    /// Parent pid, same namespace (0 for the container's first process).
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Command line, space-separated (the name in brackets when it has none).
    pub cmd: String,
}

/// What the agent hands its `exec-init` helper (agent-internal): the container's first
/// process, whose namespaces to join, and what to run there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInit {
    /// Pid of the container's first process, in the agent's pid namespace.
    pub init_pid: i32,
    /// What to run (its `capabilities` already defaulted to the container's).
    pub process: ProcessSpec,
    /// The container's `oom_score_adj`, which an exec process gets too (as runc).
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// The container's seccomp profile, which an exec process gets too (as runc).
    #[serde(default)]
    pub seccomp: Option<Seccomp>,
}

impl ExecInit {
    /// Checks the process and the `oom_score_adj`.
    ///
    /// # Errors
    /// A one-line description of the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        self.process.validate()?;
        if let Some(seccomp) = &self.seccomp {
            seccomp.validate()?;
        }
        validate_privileges(&[], self.oom_score_adj, None)
    }
}

/// Credentials of a container's process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// File mode creation mask.
    #[serde(default)]
    pub umask: Option<u32>,
}

impl User {
    /// Checks the supplementary groups: at most [`MAX_ADDITIONAL_GIDS`] (the kernel's
    /// `NGROUPS_MAX`; setgroups(2) refuses more).
    ///
    /// # Errors
    /// A one-line description of what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.additional_gids.len() > MAX_ADDITIONAL_GIDS {
            return Err(format!(
                "user.additionalGids has {} entries, more than {MAX_ADDITIONAL_GIDS}",
                self.additional_gids.len()
            ));
        }
        Ok(())
    }
}

/// Most supplementary groups of a process (`NGROUPS_MAX`, linux/limits.h).
pub const MAX_ADDITIONAL_GIDS: usize = 65536;

/// Longest container id accepted.
const MAX_ID_LEN: usize = 128;

impl ContainerSpec {
    /// Checks the fields a hostile or buggy peer could get wrong.
    ///
    /// # Errors
    /// A one-line description of the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        validate_id(&self.id)?;
        validate_process(&self.args, &self.env, &self.cwd)?;
        self.rootfs.validate()?;
        if let Some(h) = &self.hostname {
            if h.len() > 64 || h.contains('\0') {
                return Err(format!("hostname {h:?} is longer than 64 bytes or has NUL"));
            }
        }
        self.validate_process()?;
        self.hooks.validate()?;
        self.validate_linux()
    }

    fn validate_linux(&self) -> Result<(), String> {
        for mount in &self.mounts {
            mount.validate()?;
        }
        for device in &self.devices {
            device.validate()?;
        }
        for path in &self.masked_paths {
            validate_container_path("masked path", path)?;
        }
        for path in &self.readonly_paths {
            validate_container_path("read-only path", path)?;
        }
        validate_namespaces(&self.namespaces)?;
        validate_join_namespaces(&self.join_namespaces, &self.namespaces)?;
        let user_ns = self.namespaces.contains(&Namespace::User);
        validate_id_mappings("uidMappings", &self.uid_mappings, user_ns)?;
        validate_id_mappings("gidMappings", &self.gid_mappings, user_ns)?;
        self.resources.validate()?;
        if let Some(seccomp) = &self.seccomp {
            seccomp.validate()?;
        }
        validate_sysctls(&self.sysctl, |ns| {
            let kind = match ns {
                SysctlNamespace::Net => Namespace::Net,
                SysctlNamespace::Ipc => Namespace::Ipc,
                SysctlNamespace::Uts => Namespace::Uts,
            };
            (kind == Namespace::Net && self.vm_network)
                || self.namespaces.contains(&kind)
                || self.join_namespaces.iter().any(|j| j.kind == kind)
        })?;
        let joins_uts = self
            .join_namespaces
            .iter()
            .any(|j| j.kind == Namespace::Uts);
        if self.hostname.is_some() && !self.namespaces.contains(&Namespace::Uts) && !joins_uts {
            return Err("hostname needs the container's own or a joined uts namespace".into());
        }
        Ok(())
    }

    fn validate_process(&self) -> Result<(), String> {
        self.user.validate()?;
        validate_privileges(
            &self.rlimits,
            self.oom_score_adj,
            self.capabilities.as_ref(),
        )
    }
}

/// Checks the limits and privileges of any process: rlimits, `oom_score_adj`, capabilities.
fn validate_privileges(
    rlimits: &[Rlimit],
    oom_score_adj: Option<i32>,
    capabilities: Option<&Capabilities>,
) -> Result<(), String> {
    validate_rlimits(rlimits)?;
    if let Some(adj) = oom_score_adj {
        if !OOM_SCORE_ADJ_RANGE.contains(&adj) {
            return Err(format!("oomScoreAdj {adj} is outside -1000..=1000"));
        }
    }
    match capabilities {
        Some(caps) => caps.validate(),
        None => Ok(()),
    }
}

/// Checks what any process spec must satisfy: args non-empty, env `KEY=VALUE`, no NUL bytes,
/// an absolute cwd.
fn validate_process(args: &[String], env: &[String], cwd: &str) -> Result<(), String> {
    if args.is_empty() || args.iter().any(|a| a.contains('\0')) {
        return Err("process args must be non-empty and free of NUL bytes".into());
    }
    if !cwd.starts_with('/') || cwd.contains('\0') {
        return Err(format!("cwd {cwd:?} is not an absolute path"));
    }
    if env.iter().any(|e| !e.contains('=') || e.contains('\0')) {
        return Err("env entries must be KEY=VALUE without NUL bytes".into());
    }
    Ok(())
}

/// Checks a container id: 1..=128 of `[A-Za-z0-9_.-]`, not `.`-led (so never `.` or `..`).
///
/// # Errors
/// A one-line description of what is wrong with `id`.
pub fn validate_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars || id.starts_with('.') {
        return Err(format!(
            "invalid container id {id:?}: use 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-], not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            personality: None,
            id: "c1".into(),
            rootfs: Rootfs::VirtioFs {
                tag: "rootfs".into(),
                path: None,
            },
            rootfs_readonly: false,
            rootfs_propagation: None,
            hostname: Some("h".into()),
            args: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: User::default(),
            rlimits: Vec::new(),
            no_new_privileges: false,
            oom_score_adj: None,
            capabilities: None,
            mounts: Vec::new(),
            devices: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
            sysctl: BTreeMap::new(),
            namespaces: vec![Namespace::Mount, Namespace::Uts],
            join_namespaces: Vec::new(),
            vm_network: false,
            uid_mappings: Vec::new(),
            gid_mappings: Vec::new(),
            resources: Resources::default(),
            terminal: false,
            seccomp: None,
            hooks: crate::GuestHooks::default(),
        }
    }

    #[test]
    fn test_spec_net_sysctl_needs_a_network_of_the_containers_own() {
        let mut s = spec();
        s.sysctl = [("net.ipv4.ping_group_range".to_owned(), "0 0".to_owned())].into();
        assert!(
            s.validate().is_err(),
            "the guest's network is not the container's"
        );
        s.vm_network = true;
        assert!(s.validate().is_ok(), "an engine's network the VM carries");
        s.vm_network = false;
        s.join_namespaces = vec![JoinNamespace {
            kind: Namespace::Net,
            container: "pod".into(),
        }];
        assert!(s.validate().is_ok(), "a joined network namespace");
        s.join_namespaces.clear();
        s.namespaces.push(Namespace::Net);
        assert!(s.validate().is_ok(), "its own network namespace");
    }

    #[test]
    fn test_spec_validate_namespaces_and_mappings_checked() {
        let mut s = spec();
        s.namespaces.retain(|ns| *ns != Namespace::Mount);
        assert!(s.validate().is_err(), "no mount namespace");
        let mut s = spec();
        s.namespaces.push(Namespace::User);
        assert!(s.validate().is_err(), "user namespace without mappings");
        let map = IdMapping {
            container_id: 0,
            host_id: 1000,
            size: 1000,
        };
        s.uid_mappings = vec![map];
        s.gid_mappings = vec![map];
        assert!(s.validate().is_ok());
        s.gid_mappings[0].size = u32::MAX;
        assert!(s.validate().is_err(), "overflowing mapping");
        let mut s = spec();
        s.namespaces.retain(|ns| *ns != Namespace::Uts);
        assert!(s.validate().is_err(), "hostname without uts namespace");
    }

    #[test]
    fn test_spec_validate_oom_score_adj_out_of_range_rejected() {
        let mut s = spec();
        s.oom_score_adj = Some(-1000);
        assert!(s.validate().is_ok());
        s.oom_score_adj = Some(1001);
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_validate_id_bad_ids_rejected() {
        for id in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        assert!(validate_id("abc-1.2_3").is_ok());
    }

    #[test]
    fn test_spec_validate_empty_args_rejected() {
        let mut s = spec();
        assert!(s.validate().is_ok());
        s.args.clear();
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_relative_cwd_rejected() {
        let mut s = spec();
        s.cwd = "tmp".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_bad_env_rejected() {
        let mut s = spec();
        s.env.push("NOEQUALS".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_bad_rootfs_rejected() {
        for rootfs in [
            Rootfs::VirtioFs {
                tag: String::new(),
                path: None,
            },
            Rootfs::VirtioFs {
                tag: "t".repeat(37),
                path: None,
            },
            Rootfs::VirtioFs {
                tag: "rootfs".into(),
                path: Some("../etc".into()),
            },
            Rootfs::VirtioFs {
                tag: "rootfs".into(),
                path: Some("/abs".into()),
            },
            Rootfs::VirtioFs {
                tag: "rootfs".into(),
                path: Some("pod/./c1".into()),
            },
            Rootfs::Block {
                serial: String::new(),
            },
            Rootfs::Block {
                serial: "../../dev/sda".into(),
            },
            Rootfs::Block {
                serial: "s".repeat(21),
            },
        ] {
            let mut s = spec();
            s.rootfs = rootfs.clone();
            assert!(s.validate().is_err(), "{rootfs:?}");
        }
        let mut s = spec();
        s.rootfs = Rootfs::Block {
            serial: "husk-rootfs".into(),
        };
        assert!(s.validate().is_ok());
    }

    #[test]
    fn test_spec_validate_rootfs_path_in_share_accepted() {
        let mut s = spec();
        s.rootfs = Rootfs::VirtioFs {
            tag: "pod".into(),
            path: Some("containers/c1/rootfs".into()),
        };
        assert!(s.validate().is_ok());
    }

    #[test]
    fn test_rootfs_json_without_path_decodes_to_none() {
        let rootfs: Rootfs = serde_json::from_str(r#"{"kind":"virtio_fs","tag":"t"}"#).unwrap();
        let want = Rootfs::VirtioFs {
            tag: "t".into(),
            path: None,
        };
        assert_eq!(rootfs, want);
    }

    fn joining(kind: Namespace) -> ContainerSpec {
        let mut s = spec();
        s.namespaces.retain(|ns| *ns != kind);
        s.join_namespaces = vec![JoinNamespace {
            kind,
            container: "sandbox".into(),
        }];
        s
    }

    #[test]
    fn test_spec_validate_join_pod_namespaces_accepted() {
        for kind in [
            Namespace::Net,
            Namespace::Ipc,
            Namespace::Uts,
            Namespace::Pid,
            Namespace::Cgroup,
        ] {
            assert!(joining(kind).validate().is_ok(), "{kind:?}");
        }
    }

    #[test]
    fn test_spec_validate_join_also_own_namespace_rejected() {
        let mut s = joining(Namespace::Net);
        s.namespaces.push(Namespace::Net);
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_join_user_or_mount_rejected() {
        let mut s = joining(Namespace::Net);
        s.join_namespaces[0].kind = Namespace::User;
        assert!(s.validate().is_err(), "user");
        let mut s = joining(Namespace::Mount);
        s.namespaces.push(Namespace::Mount);
        s.join_namespaces[0].kind = Namespace::Mount;
        assert!(s.validate().is_err(), "mount");
    }

    #[test]
    fn test_spec_validate_join_same_kind_twice_rejected() {
        let mut s = joining(Namespace::Ipc);
        s.join_namespaces.push(s.join_namespaces[0].clone());
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_join_invalid_container_rejected() {
        let mut s = joining(Namespace::Net);
        s.join_namespaces[0].container = "../x".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_spec_validate_hostname_with_joined_uts_accepted() {
        let s = joining(Namespace::Uts);
        assert!(s.hostname.is_some());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn test_spec_json_without_join_namespaces_decodes_to_empty() {
        let mut json = serde_json::to_value(spec()).unwrap();
        json.as_object_mut().unwrap().remove("join_namespaces");
        let s: ContainerSpec = serde_json::from_value(json).unwrap();
        assert!(s.join_namespaces.is_empty());
    }

    fn process() -> ProcessSpec {
        ProcessSpec {
            console_size: None,
            args: vec!["id".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: User::default(),
            terminal: false,
            rlimits: Vec::new(),
            no_new_privileges: false,
            capabilities: None,
        }
    }

    #[test]
    fn test_process_json_without_privileges_decodes_to_defaults() {
        let json = r#"{"args":["id"],"env":[],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        let p: ProcessSpec = serde_json::from_str(json).unwrap();
        assert!(p.rlimits.is_empty());
        assert!(!p.no_new_privileges);
        assert_eq!(p.capabilities, None);
    }

    #[test]
    fn test_process_validate_privileges_checked() {
        let mut p = process();
        p.capabilities = Some(Capabilities {
            bounding: vec!["CAP_KILL".into()],
            ..Capabilities::default()
        });
        p.rlimits = vec![Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            soft: 10,
            hard: 20,
        }];
        assert!(p.validate().is_ok());
        let mut bad = p.clone();
        bad.capabilities = Some(Capabilities {
            effective: vec!["CAP_../x".into()],
            ..Capabilities::default()
        });
        assert!(bad.validate().is_err(), "capability name");
        let mut bad = p.clone();
        bad.rlimits[0].soft = 30;
        assert!(bad.validate().is_err(), "soft above hard");
        let mut bad = p;
        bad.user.additional_gids = vec![1; MAX_ADDITIONAL_GIDS + 1];
        assert!(bad.validate().is_err(), "too many groups");
    }

    #[test]
    fn test_exec_init_validate_oom_score_adj_out_of_range_rejected() {
        let mut init = ExecInit {
            init_pid: 1,
            process: process(),
            oom_score_adj: Some(1000),
            seccomp: None,
        };
        assert!(init.validate().is_ok());
        init.oom_score_adj = Some(-1001);
        assert!(init.validate().is_err());
    }

    #[test]
    fn test_rootfs_json_shape_tagged_by_kind() {
        let json = serde_json::to_string(&Rootfs::Block { serial: "r".into() }).unwrap();
        assert_eq!(json, r#"{"kind":"block","serial":"r"}"#);
    }
}
