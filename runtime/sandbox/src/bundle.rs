//! OCI bundle -> what the VM and the agent need. The only module that reads `oci-spec` types.
//!
//! Supported for now (OCI runtime spec 1.2, config.md): `root.path` (a directory, shared with
//! virtio-fs, or a raw ext4 disk image, attached as a virtio-blk disk), `root.readonly`,
//! `hostname`, `process.{args, env, cwd, user.{uid, gid, additionalGids, umask}}`,
//! `process.{rlimits, noNewPrivileges, oomScoreAdj, capabilities}` (`bundle::process`),
//! `mounts` (kernel file systems, and bind mounts through extra virtio-fs shares:
//! `bundle::binds`) and `linux.{namespaces, uid/gidMappings, maskedPaths, readonlyPaths,
//! sysctl}` (`bundle::linux`), `linux.resources` (`bundle::resources`), `linux.seccomp`
//! (`bundle::seccomp`). A field husk cannot honour yet (`process.terminal = true`,
//! `process.apparmorProfile`, `linux.intelRdt`, ...) is an error, never silently ignored;
//! README.md lists every field and the few ignored ones.

mod binds;
mod linux;
mod mountpoints;
mod process;
mod resources;
mod seccomp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use husk_protocol::{ContainerSpec, Namespace, ProcessSpec, Rootfs as AgentRootfs};
use oci_spec::runtime::Spec;
use tracing::debug;

pub use binds::BINDS_TAG;

use crate::config::RuntimeConfig;
use crate::SandboxError;

/// virtio-fs tag of the rootfs share.
pub const ROOTFS_TAG: &str = "rootfs";
/// virtio-blk serial of the rootfs disk.
pub const ROOTFS_SERIAL: &str = "husk-rootfs";

/// The container's root filesystem on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// A directory, shared into the guest with virtio-fs (tag [`ROOTFS_TAG`]).
    Dir(PathBuf),
    /// A raw disk image holding an ext4 filesystem, attached as a virtio-blk disk (serial
    /// [`ROOTFS_SERIAL`]).
    Image(PathBuf),
}

impl Bundle {
    /// Guest memory for the container's memory limit: the limit plus [`GUEST_OVERHEAD_MIB`]
    /// (at least 64 MiB); `None` without a limit.
    pub fn sized_memory_mib(&self) -> Option<u32> {
        memory_for(&self.spec.resources)
    }

    /// vCPUs for the container's CPU quota (rounded up) or, without one, its cpuset; `None`
    /// when it has neither.
    pub fn sized_vcpus(&self) -> Option<u32> {
        vcpus_for(&self.spec.resources)
    }
}

/// [`Bundle::sized_memory_mib`] for limits `r`.
fn memory_for(r: &husk_protocol::Resources) -> Option<u32> {
    let limit = r.memory_max?;
    let mib = limit
        .div_ceil(1 << 20)
        .saturating_add(GUEST_OVERHEAD_MIB)
        .max(64);
    Some(u32::try_from(mib).unwrap_or(u32::MAX).min(65536))
}

/// [`Bundle::sized_vcpus`] for limits `r`.
fn vcpus_for(r: &husk_protocol::Resources) -> Option<u32> {
    let from_quota = r.cpu_quota_us.map(|quota| {
        let period = r
            .cpu_period_us
            .unwrap_or(husk_protocol::DEFAULT_CPU_PERIOD_US)
            .max(1);
        quota.div_ceil(period)
    });
    // The guest must have every CPU the cpuset names (the agent writes the same list to the
    // container's cpuset.cpus): CPU n needs n + 1 vCPUs, whatever the quota.
    let span = r.cpuset_cpus.as_deref().and_then(cpu_list_span);
    let count = match (from_quota, span) {
        (Some(q), Some(s)) => q.max(s),
        (q, s) => q.or(s)?,
    };
    Some(
        u32::try_from(count)
            .unwrap_or(MAX_VCPUS)
            .clamp(1, MAX_VCPUS),
    )
}

/// How many vCPUs a list like `0-3,6` needs (its highest CPU plus one); `None` when it is not one.
fn cpu_list_span(list: &str) -> Option<u64> {
    list.split(',').map(str::trim).try_fold(0u64, |n, part| {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi) = (lo.parse::<u64>().ok()?, hi.parse::<u64>().ok()?);
        (hi >= lo).then(|| n.max(hi.saturating_add(1)))
    })
}

impl Bundle {
    /// Makes the mount destinations a read-only directory rootfs lacks (the guest cannot: the
    /// host exports it read-only); nothing for a writable or disk-image rootfs.
    ///
    /// # Errors
    /// [`SandboxError::InvalidConfig`] naming the destination that cannot be made.
    pub fn prepare_mountpoints(&self) -> Result<(), SandboxError> {
        let Rootfs::Dir(rootfs) = &self.rootfs else {
            return Ok(());
        };
        if !self.spec.rootfs_readonly {
            return Ok(());
        }
        mountpoints::make(rootfs, &self.spec.mounts).map_err(|reason| SandboxError::InvalidConfig {
            path: self.dir.join("config.json"),
            reason,
        })
    }
}

impl Rootfs {
    /// The host path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Dir(path) | Self::Image(path) => path,
        }
    }
}

/// Annotation: guest memory in MiB (64 up to the runtime config's `max_memory_mib`), over
/// `--memory`.
pub const ANNOTATION_MEMORY: &str = "io.husk.vm.memory";
/// Annotation: guest vCPUs (1 up to the runtime config's `max_vcpus`), over `--vcpus`.
pub const ANNOTATION_VCPUS: &str = "io.husk.vm.vcpus";
/// Annotation: `auto`, `kvm` or `qemu`, over `--hypervisor` (only if the runtime config allows
/// it).
pub const ANNOTATION_HYPERVISOR: &str = "io.husk.hypervisor";
/// Annotation: `false` boots the VM cold instead of from a boot snapshot (`true`, the
/// default, changes nothing). Allowed by default: it only gives up speed.
pub const ANNOTATION_SNAPSHOT: &str = "io.husk.snapshot";

/// What the bundle's annotations ask of its VM, as the operator's [`RuntimeConfig`] lets them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmOverrides {
    /// [`ANNOTATION_MEMORY`].
    pub memory_mib: Option<u32>,
    /// [`ANNOTATION_VCPUS`].
    pub vcpus: Option<u32>,
    /// [`ANNOTATION_HYPERVISOR`].
    pub hypervisor: Option<husk_hypervisor::HypervisorKind>,
    /// [`ANNOTATION_SNAPSHOT`].
    pub snapshot: Option<bool>,
}

impl VmOverrides {
    /// The VM the annotations ask for under `config` and the container's limits `r`:
    /// - an annotation `config` does not allow is ignored (a debug line: engines pass
    ///   annotations along, a container must not fail for them);
    /// - a size above `config`'s maximum is an error: the operator allowed the annotation, the
    ///   bundle's author asked for more than the operator allows;
    /// - a size is never above what the container's own limits size the VM to (memory limit
    ///   plus the guest's overhead, CPU quota or cpuset): it is capped there, silently (a
    ///   debug line), as a VM bigger than the container may use is only waste.
    fn from_annotations(
        annotations: &BTreeMap<String, String>,
        config: &RuntimeConfig,
        r: &husk_protocol::Resources,
    ) -> Result<Self, String> {
        let get = |key: &str| {
            let value = annotations.get(key)?;
            if !config.allows(key) {
                debug!(
                    annotation = key,
                    value = %value,
                    "annotation not allowed by the runtime config: ignored"
                );
                return None;
            }
            Some(value)
        };
        let number = |key: &str, max: u32, what: &str| {
            get(key)
                .map(|v| match v.parse::<u32>() {
                    Ok(n) if n > max && n >= min_of(key) => Err(format!(
                        "annotation {key}={v:?} is above the runtime config's {what} ({max})"
                    )),
                    Ok(n) if n >= min_of(key) => Ok(n),
                    _ => Err(format!(
                        "annotation {key}={v:?} is not a number in {}..={max}",
                        min_of(key)
                    )),
                })
                .transpose()
        };
        let hypervisor = get(ANNOTATION_HYPERVISOR)
            .map(|v| {
                v.parse()
                    .map_err(|e| format!("annotation {ANNOTATION_HYPERVISOR}: {e}"))
            })
            .transpose()?;
        let memory_mib = number(ANNOTATION_MEMORY, config.max_memory_mib, "max_memory_mib")?;
        let vcpus = number(ANNOTATION_VCPUS, config.max_vcpus, "max_vcpus")?;
        let snapshot = get(ANNOTATION_SNAPSHOT)
            .map(|v| match v.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(format!(
                    "annotation {ANNOTATION_SNAPSHOT}={other:?} is not true or false"
                )),
            })
            .transpose()?;
        Ok(Self {
            memory_mib: capped(ANNOTATION_MEMORY, memory_mib, memory_for(r)),
            vcpus: capped(ANNOTATION_VCPUS, vcpus, vcpus_for(r)),
            hypervisor,
            snapshot,
        })
    }
}

/// The smallest value of a size annotation.
fn min_of(key: &str) -> u32 {
    match key {
        ANNOTATION_MEMORY => 64,
        _ => 1,
    }
}

/// `asked`, at most `limit` (what the container's limits size the VM to).
fn capped(key: &str, asked: Option<u32>, limit: Option<u32>) -> Option<u32> {
    match (asked, limit) {
        (Some(n), Some(limit)) if n > limit => {
            debug!(
                annotation = key,
                asked = n,
                limit,
                "annotation above the container's limits: capped"
            );
            Some(limit)
        }
        _ => asked,
    }
}

/// Guest memory beyond a container's memory limit: kernel, agent, page cache headroom.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The most vCPUs a VM gets (the guest kernel's NR_CPUS).
const MAX_VCPUS: u32 = 32;

/// What a container is in its pod (the containerd shim's sandbox: one VM for several
/// containers), for the `linux.namespaces` entries with a `path`, CRI's way of sharing the
/// pod's namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRole<'a> {
    /// Alone in its VM (husk's CLI): a path is refused.
    Alone,
    /// The pod's first container: a path is the pod's namespace on the host; in the VM the
    /// container gets a new one.
    Sandbox,
    /// A later container of the pod: a path means the sandbox container's namespace.
    Member {
        /// The sandbox container's id.
        sandbox: &'a str,
    },
}

/// A bundle ready to run.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// VM size and door from the annotations.
    pub vm: VmOverrides,
    /// The host hooks.
    pub hooks: crate::hooks::Hooks,
    /// The bundle directory (absolute).
    pub dir: PathBuf,
    /// The rootfs (absolute path).
    pub rootfs: Rootfs,
    /// config.json's annotations.
    pub annotations: BTreeMap<String, String>,
    /// What the agent builds.
    pub spec: ContainerSpec,
    /// The host files and directories bind mounts need: the entries of the [`BINDS_TAG`]
    /// share.
    pub bind_entries: Vec<husk_hypervisor::ShareEntry>,
    /// The network namespace on the host an engine made for the container (a pod's sandbox
    /// container, Podman's), whose interface the VM's network device stands in for.
    pub pod_netns: Option<PathBuf>,
    /// A lone container that asks for a new network namespace and has createRuntime (or
    /// prestart) hooks: they may connect the namespace of its `state.pid` (Docker's
    /// libnetwork does), so its VM gets a network device for what they put there and the
    /// container has the VM's network instead of a namespace of its own in the guest.
    pub hooked_network: bool,
    /// `linux.cgroupsPath`: the container's host cgroup, which holds its VM's host processes.
    pub cgroups_path: Option<String>,
    /// `linux.resources.cpu.shares`: the VM's share of host CPU time in that cgroup.
    pub cpu_shares: Option<u64>,
}

impl Bundle {
    /// Reads and checks `<dir>/config.json` for container `id`.
    ///
    /// # Errors
    /// [`SandboxError::ReadConfig`], [`SandboxError::InvalidConfig`],
    /// [`SandboxError::MissingRootfs`], or [`SandboxError::RuntimeConfig`] for the operator's
    /// file ([`RuntimeConfig::load`]).
    pub fn load(dir: &Path, id: &str) -> Result<Self, SandboxError> {
        Self::load_in_pod(dir, id, PodRole::Alone)
    }

    /// [`Bundle::load`] for a container that is `role` in its pod: `linux.namespaces` paths
    /// are read as [`PodRole`] says.
    ///
    /// # Errors
    /// As [`Bundle::load`].
    pub fn load_in_pod(dir: &Path, id: &str, role: PodRole<'_>) -> Result<Self, SandboxError> {
        Self::load_with_config(dir, id, role, &RuntimeConfig::load()?)
    }

    /// [`Bundle::load_in_pod`] under the runtime configuration `config` (which annotations
    /// are honoured, up to which VM size).
    ///
    /// # Errors
    /// As [`Bundle::load`].
    pub fn load_with_config(
        dir: &Path,
        id: &str,
        role: PodRole<'_>,
        config: &RuntimeConfig,
    ) -> Result<Self, SandboxError> {
        let dir = &std::path::absolute(dir).map_err(|source| SandboxError::StateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("config.json");
        let mut spec = Spec::load(&path).map_err(|source| SandboxError::ReadConfig {
            path: path.clone(),
            source,
        })?;
        if role != PodRole::Alone {
            drop_host_lsm_labels(&mut spec);
        }
        let invalid = |reason: &str| SandboxError::InvalidConfig {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        let root = spec.root().as_ref().ok_or_else(|| invalid("no root"))?;
        let (rootfs, agent_rootfs) = resolve_rootfs(dir, root.path())?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("no process"))?;
        let terminal = process.terminal().unwrap_or(false);
        let hooks =
            crate::hooks::Hooks::from_spec(spec.hooks().as_ref()).map_err(|e| invalid(&e))?;
        let annotations = spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let guest_hooks = crate::hooks::guest_hooks(spec.hooks().as_ref(), id, dir, &annotations)
            .map_err(|e| invalid(&e))?;
        let attrs = process::attrs(process).map_err(|reason| invalid(&reason))?;
        let mut linux = linux::attrs(&spec, dir, role).map_err(|reason| invalid(&reason))?;
        let hooked_network = role == PodRole::Alone
            && !hooks.create_runtime.is_empty()
            && linux.namespaces.contains(&Namespace::Net);
        if hooked_network {
            linux.namespaces.retain(|n| *n != Namespace::Net);
        }
        let spec = ContainerSpec {
            id: id.to_owned(),
            rootfs: agent_rootfs,
            rootfs_readonly: root.readonly().unwrap_or(false),
            rootfs_propagation: linux.rootfs_propagation,
            hostname: spec.hostname().clone(),
            args: attrs.args,
            env: process.env().clone().unwrap_or_default(),
            cwd: process.cwd().to_string_lossy().into_owned(),
            user: attrs.user,
            rlimits: attrs.rlimits,
            no_new_privileges: attrs.no_new_privileges,
            oom_score_adj: attrs.oom_score_adj,
            capabilities: attrs.capabilities,
            mounts: linux.mounts,
            devices: linux.devices,
            masked_paths: linux.masked_paths,
            readonly_paths: linux.readonly_paths,
            sysctl: linux.sysctl,
            namespaces: linux.namespaces,
            join_namespaces: linux.join_namespaces,
            vm_network: hooked_network || linux.pod_netns.is_some(),
            resources: linux.resources,
            seccomp: linux.seccomp,
            personality: linux.personality,
            uid_mappings: linux.uid_mappings,
            gid_mappings: linux.gid_mappings,
            terminal,
            hooks: guest_hooks,
        };
        spec.validate().map_err(|reason| invalid(&reason))?;
        let vm = VmOverrides::from_annotations(&annotations, config, &spec.resources)
            .map_err(|e| invalid(&e))?;
        Ok(Self {
            vm,
            hooks,
            dir: dir.clone(),
            rootfs,
            annotations,
            spec,
            bind_entries: linux.bind_entries,
            pod_netns: linux.pod_netns,
            hooked_network,
            cgroups_path: linux.cgroups_path,
            cpu_shares: linux.cpu_shares,
        })
    }
}

/// Clears the host LSM labels (AppArmor profile, SELinux labels) that containerd's CRI puts on
/// every container of a pod where the host enforces them: they name host policies, and the
/// guest kernel has no LSM; the VM is the container's confinement.
fn drop_host_lsm_labels(spec: &mut Spec) {
    if let Some(mut process) = spec.process().clone() {
        drop_process_lsm_labels(&mut process);
        spec.set_process(Some(process));
    }
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_mount_label(None);
        spec.set_linux(Some(linux));
    }
}

fn drop_process_lsm_labels(process: &mut oci_spec::runtime::Process) {
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);
}

/// The rootfs at `path` (relative to the bundle `dir`): a directory or a disk image file.
fn resolve_rootfs(dir: &Path, path: &Path) -> Result<(Rootfs, AgentRootfs), SandboxError> {
    let rootfs = match path.is_absolute() {
        true => path.to_owned(),
        false => dir.join(path),
    };
    if rootfs.is_dir() {
        let tag = ROOTFS_TAG.to_owned();
        Ok((
            Rootfs::Dir(rootfs),
            AgentRootfs::VirtioFs { tag, path: None },
        ))
    } else if rootfs.is_file() {
        let serial = ROOTFS_SERIAL.to_owned();
        Ok((Rootfs::Image(rootfs), AgentRootfs::Block { serial }))
    } else {
        Err(SandboxError::MissingRootfs { path: rootfs })
    }
}

/// The process `husk exec -p FILE` asks for: an OCI `process` object.
///
/// # Errors
/// [`SandboxError::ReadConfig`]-like errors naming the file: unreadable, not a process, or
/// invalid fields.
pub fn process_from_file(path: &Path) -> Result<ProcessSpec, SandboxError> {
    let invalid = |reason: String| SandboxError::InvalidConfig {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    process_from_json(&bytes, false).map_err(invalid)
}

/// The process an OCI `process` JSON object describes (`exec -p`, the shim's Exec), converted
/// as a container's first process is ([`process::attrs`]). As runc, exactly its fields: no
/// `capabilities` gives it the container's (the agent's default), no `rlimits` keeps the
/// guest's; its `oomScoreAdj` is ignored (an exec process gets the container's).
/// `drop_host_lsm_labels`: clear the AppArmor profile and SELinux label first, as for a pod's
/// containers ([`PodRole`]); otherwise they are refused as in config.json.
///
/// # Errors
/// Not an OCI process, or invalid or unsupported fields.
pub fn process_from_json(bytes: &[u8], drop_host_lsm_labels: bool) -> Result<ProcessSpec, String> {
    let mut process: oci_spec::runtime::Process =
        serde_json::from_slice(bytes).map_err(|e| format!("not an OCI process: {e}"))?;
    if drop_host_lsm_labels {
        drop_process_lsm_labels(&mut process);
    }
    let attrs = process::attrs(&process)?;
    let spec = ProcessSpec {
        args: attrs.args,
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().to_string_lossy().into_owned(),
        user: attrs.user,
        terminal: process.terminal().unwrap_or(false),
        rlimits: attrs.rlimits,
        no_new_privileges: attrs.no_new_privileges,
        capabilities: attrs.capabilities,
        console_size: process
            .console_size()
            .as_ref()
            .map(|b| (clamp_u16(b.height()), clamp_u16(b.width()))),
    };
    spec.validate()?;
    Ok(spec)
}

/// A console dimension as a window size field (larger ones are the largest).
fn clamp_u16(n: u64) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// The limits an OCI `linux.resources` JSON object sets (the shim's Update).
///
/// # Errors
/// Not OCI resources, or a limit husk cannot set.
pub fn resources_from_json(bytes: &[u8]) -> Result<husk_protocol::Resources, String> {
    let r: oci_spec::runtime::LinuxResources =
        serde_json::from_slice(bytes).map_err(|e| format!("not OCI linux.resources: {e}"))?;
    resources::resources(&r)
}

/// The process `husk exec ID ARGS...` asks for: the container's own env, cwd, user, rlimits,
/// `noNewPrivileges` and capabilities from its config.json (converted as for the container),
/// with the request's overrides, as runc's: `--cap` adds to the bounding, effective, permitted
/// and ambient sets (an ambient one that is not inheritable is left out by the agent, as runc
/// does), `--no-new-privs` sets it, `--user uid` keeps the container's gid, `--additional-gids`
/// adds groups.
///
/// # Errors
/// The bundle's config cannot be read, or an override is invalid (`--user` not `uid[:gid]`).
pub fn exec_process(
    bundle: &Path,
    id: &str,
    request: &crate::lifecycle::ExecRequest,
) -> Result<ProcessSpec, SandboxError> {
    let base = Bundle::load(bundle, id)?.spec;
    let invalid = |reason: String| SandboxError::InvalidConfig {
        path: bundle.join("config.json"),
        reason,
    };
    let mut user = base.user;
    if let Some(value) = &request.user {
        let number = |s: &str| {
            s.parse()
                .map_err(|_| invalid(format!("--user {value:?} is not uid[:gid]")))
        };
        let (uid, gid) = match value.split_once(':') {
            Some((uid, gid)) => (uid, Some(gid)),
            None => (value.as_str(), None),
        };
        user.uid = number(uid)?;
        if let Some(gid) = gid {
            user.gid = number(gid)?;
        }
    }
    user.additional_gids
        .extend(request.additional_gids.iter().copied());
    let mut capabilities = base.capabilities;
    if let Some(caps) = &mut capabilities {
        for cap in &request.caps {
            for set in [
                &mut caps.bounding,
                &mut caps.effective,
                &mut caps.permitted,
                &mut caps.ambient,
            ] {
                set.push(cap.clone());
            }
        }
    }
    let mut env = base.env;
    env.extend(request.env.iter().cloned());
    let spec = ProcessSpec {
        args: request.args.clone(),
        env,
        cwd: request.cwd.clone().unwrap_or(base.cwd),
        user,
        terminal: request.terminal,
        rlimits: base.rlimits,
        no_new_privileges: base.no_new_privileges || request.no_new_privileges,
        capabilities,
        console_size: None,
    };
    spec.validate().map_err(|e| SandboxError::InvalidConfig {
        path: PathBuf::from("exec"),
        reason: e,
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use husk_protocol::User;

    use super::*;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    fn default_config() -> String {
        serde_json::to_string(&Spec::default()).unwrap()
    }

    #[test]
    fn test_load_default_spec_maps_fields() {
        let dir = bundle_with(&default_config());
        let b = Bundle::load(dir.path(), "c1").unwrap();
        assert_eq!(b.rootfs, Rootfs::Dir(dir.path().join("rootfs")));
        assert_eq!(b.spec.args, vec!["sh"]);
        assert_eq!(b.spec.cwd, "/");
        assert_eq!(b.spec.id, "c1");
        assert!(b.spec.env.iter().any(|e| e.starts_with("PATH=")));
    }

    /// The default config with CRI's additions for a pod's app container: the pod's network
    /// namespace by path and a host AppArmor profile.
    fn pod_member_config() -> String {
        let mut config: serde_json::Value = serde_json::from_str(&default_config()).unwrap();
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        for ns in namespaces.iter_mut() {
            if ns["type"] == "network" {
                ns["path"] = "/proc/1234/ns/net".into();
            }
        }
        config["process"]["apparmorProfile"] = "cri-containerd.apparmor.d".into();
        config.to_string()
    }

    #[test]
    fn test_load_in_pod_roles_read_namespace_paths_and_drop_lsm_labels() {
        let dir = bundle_with(&pod_member_config());
        let alone = Bundle::load(dir.path(), "c").unwrap_err().to_string();
        assert!(alone.contains("apparmorProfile"), "{alone}");

        // The pod's network namespace: the VM's network device carries it, in the agent's.
        let sandbox = Bundle::load_in_pod(dir.path(), "pod", PodRole::Sandbox).unwrap();
        assert!(!sandbox
            .spec
            .namespaces
            .contains(&husk_protocol::Namespace::Net));
        assert_eq!(sandbox.pod_netns, Some("/proc/1234/ns/net".into()));
        assert!(sandbox.spec.join_namespaces.is_empty());

        let role = PodRole::Member { sandbox: "pod" };
        let member = Bundle::load_in_pod(dir.path(), "app", role).unwrap();
        assert!(!member
            .spec
            .namespaces
            .contains(&husk_protocol::Namespace::Net));
        assert_eq!(
            member.spec.join_namespaces,
            vec![husk_protocol::JoinNamespace {
                kind: husk_protocol::Namespace::Net,
                container: "pod".into()
            }]
        );
    }

    fn with_annotations(pairs: &[(&str, &str)]) -> String {
        let mut config: serde_json::Value = serde_json::from_str(&default_config()).unwrap();
        config["annotations"] = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        config.to_string()
    }

    #[test]
    fn test_cpu_list_span_highest_cpu_plus_one() {
        assert_eq!(cpu_list_span("0-3,6"), Some(7));
        assert_eq!(cpu_list_span("1"), Some(2));
        assert_eq!(cpu_list_span("3-1"), None);
        assert_eq!(cpu_list_span("x"), None);
    }

    #[test]
    fn test_sized_vm_from_resources() {
        let dir = bundle_with(&default_config());
        let mut b = Bundle::load(dir.path(), "c1").unwrap();
        assert_eq!((b.sized_memory_mib(), b.sized_vcpus()), (None, None));
        b.spec.resources.memory_max = Some(256 << 20);
        b.spec.resources.cpu_quota_us = Some(150_000);
        b.spec.resources.cpu_period_us = Some(100_000);
        assert_eq!(
            (b.sized_memory_mib(), b.sized_vcpus()),
            (Some(320), Some(2))
        );
        b.spec.resources.cpu_quota_us = None;
        b.spec.resources.cpuset_cpus = Some("0-2".into());
        assert_eq!(b.sized_vcpus(), Some(3));
    }

    /// Every annotation allowed, the defaults' maxima.
    fn permissive() -> RuntimeConfig {
        RuntimeConfig {
            allowed_annotations: vec![
                ANNOTATION_MEMORY.into(),
                ANNOTATION_VCPUS.into(),
                ANNOTATION_HYPERVISOR.into(),
                ANNOTATION_SNAPSHOT.into(),
            ],
            ..RuntimeConfig::default()
        }
    }

    fn load_under(config_json: &str, config: &RuntimeConfig) -> Result<Bundle, SandboxError> {
        let dir = bundle_with(config_json);
        Bundle::load_with_config(dir.path(), "c1", PodRole::Alone, config)
    }

    #[test]
    fn test_load_cgroups_path_sizes_host_cgroup() {
        let mut config: serde_json::Value = serde_json::from_str(&default_config()).unwrap();
        config["linux"]["cgroupsPath"] = "system.slice:docker:abc".into();
        config["linux"]["resources"] =
            serde_json::json!({"cpu": {"quota": 50000, "period": 100000}});
        let dir = bundle_with(&config.to_string());
        config["linux"]["cgroupsPath"] = "".into();
        let unset = bundle_with(&config.to_string());

        let b = Bundle::load(dir.path(), "c1").unwrap();
        let cgroup = crate::run::host_cgroup(&b, 256).unwrap();
        let none = Bundle::load(unset.path(), "c1").unwrap();

        assert_eq!(b.cgroups_path.as_deref(), Some("system.slice:docker:abc"));
        assert_eq!(
            cgroup,
            husk_hypervisor::cgroup::CgroupSpec {
                path: "system.slice:docker:abc".into(),
                memory_limit_bytes: Some(husk_hypervisor::cgroup::vm_memory_limit_bytes(256)),
                cpu_quota_us: Some(50_000),
                cpu_period_us: Some(100_000),
                cpuset_cpus: None,
                cpuset_mems: None,
                cpu_shares: None,
                cpu_weight: None,
            }
        );
        assert_eq!(none.cgroups_path, None);
        assert_eq!(crate::run::host_cgroup(&none, 256), None);
    }

    #[test]
    fn test_load_vm_annotations_parsed() {
        let config = with_annotations(&[
            (ANNOTATION_MEMORY, "128"),
            (ANNOTATION_VCPUS, "2"),
            (ANNOTATION_HYPERVISOR, "qemu"),
            (ANNOTATION_SNAPSHOT, "false"),
        ]);
        let b = load_under(&config, &permissive()).unwrap();
        assert_eq!(
            b.vm,
            VmOverrides {
                memory_mib: Some(128),
                vcpus: Some(2),
                hypervisor: Some(husk_hypervisor::HypervisorKind::Qemu),
                snapshot: Some(false),
            }
        );
    }

    #[test]
    fn test_load_snapshot_annotation_allowed_by_default_and_checked() {
        let off = with_annotations(&[(ANNOTATION_SNAPSHOT, "false")]);
        let b = load_under(&off, &RuntimeConfig::default()).unwrap();
        assert_eq!(b.vm.snapshot, Some(false));
        let bad = with_annotations(&[(ANNOTATION_SNAPSHOT, "no")]);
        let err = load_under(&bad, &RuntimeConfig::default()).unwrap_err();
        assert!(err.to_string().contains("not true or false"), "{err}");
    }

    #[test]
    fn test_load_default_policy_hypervisor_annotation_ignored() {
        let config =
            with_annotations(&[(ANNOTATION_MEMORY, "128"), (ANNOTATION_HYPERVISOR, "xen")]);
        let b = load_under(&config, &RuntimeConfig::default()).unwrap();
        assert_eq!((b.vm.memory_mib, b.vm.hypervisor), (Some(128), None));
    }

    #[test]
    fn test_load_disallowed_size_annotations_ignored() {
        let config = with_annotations(&[(ANNOTATION_MEMORY, "65536"), (ANNOTATION_VCPUS, "x")]);
        let none = RuntimeConfig {
            allowed_annotations: Vec::new(),
            ..RuntimeConfig::default()
        };
        assert_eq!(
            load_under(&config, &none).unwrap().vm,
            VmOverrides::default()
        );
    }

    #[test]
    fn test_load_annotation_above_operator_max_invalid_config() {
        for (key, value, what) in [
            (ANNOTATION_MEMORY, "4096", "max_memory_mib (2048)"),
            (ANNOTATION_VCPUS, "8", "max_vcpus (4)"),
        ] {
            let err = load_under(&with_annotations(&[(key, value)]), &permissive()).unwrap_err();
            assert!(
                matches!(&err, SandboxError::InvalidConfig { reason, .. }
                    if reason.contains(key) && reason.contains(what)),
                "{err}"
            );
        }
    }

    #[test]
    fn test_load_annotations_capped_at_container_limits() {
        let mut config: serde_json::Value = serde_json::from_str(&with_annotations(&[
            (ANNOTATION_MEMORY, "1024"),
            (ANNOTATION_VCPUS, "4"),
        ]))
        .unwrap();
        config["linux"]["resources"] = serde_json::json!({
            "memory": {"limit": 256 << 20},
            "cpu": {"quota": 150_000, "period": 100_000},
        });
        let b = load_under(&config.to_string(), &permissive()).unwrap();
        // 256 MiB + the guest's 64 MiB; 1.5 CPUs rounded up.
        assert_eq!((b.vm.memory_mib, b.vm.vcpus), (Some(320), Some(2)));
    }

    #[test]
    fn test_load_annotations_below_container_limits_kept() {
        let mut config: serde_json::Value =
            serde_json::from_str(&with_annotations(&[(ANNOTATION_MEMORY, "128")])).unwrap();
        config["linux"]["resources"] = serde_json::json!({"memory": {"limit": 1 << 30}});
        let b = load_under(&config.to_string(), &permissive()).unwrap();
        assert_eq!(b.vm.memory_mib, Some(128));
    }

    #[test]
    fn test_load_bad_vm_annotation_invalid_config() {
        for (key, value) in [
            (ANNOTATION_MEMORY, "lots"),
            (ANNOTATION_MEMORY, "16"),
            (ANNOTATION_VCPUS, "0"),
            (ANNOTATION_HYPERVISOR, "xen"),
        ] {
            let err = load_under(&with_annotations(&[(key, value)]), &permissive()).unwrap_err();
            assert!(
                matches!(&err, SandboxError::InvalidConfig { reason, .. } if reason.contains(key)),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn test_load_missing_config_read_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Bundle::load(dir.path(), "c"),
            Err(SandboxError::ReadConfig { .. })
        ));
    }

    #[test]
    fn test_load_not_json_read_error() {
        let dir = bundle_with("{not json");
        assert!(matches!(
            Bundle::load(dir.path(), "c"),
            Err(SandboxError::ReadConfig { .. })
        ));
    }

    #[test]
    fn test_load_missing_rootfs_rejected() {
        let dir = bundle_with(&default_config());
        std::fs::remove_dir(dir.path().join("rootfs")).unwrap();
        assert!(matches!(
            Bundle::load(dir.path(), "c"),
            Err(SandboxError::MissingRootfs { .. })
        ));
    }

    #[test]
    fn test_load_empty_args_rejected() {
        let config = default_config().replace("[\"sh\"]", "[]");
        let dir = bundle_with(&config);
        let err = Bundle::load(dir.path(), "c").unwrap_err();
        assert!(err.to_string().contains("args"), "{err}");
    }

    #[test]
    fn test_load_terminal_mapped() {
        let config = default_config().replace("\"terminal\":false", "\"terminal\":true");
        assert!(config.contains("\"terminal\":true"));
        let dir = bundle_with(&config);
        assert!(Bundle::load(dir.path(), "c").unwrap().spec.terminal);
    }

    const EXEC_PROCESS: &str = r#"{"args":["id"],"cwd":"/","user":{"uid":1000,"gid":1000,
        "additionalGids":[10,20],"umask":63},"noNewPrivileges":true,
        "rlimits":[{"type":"RLIMIT_NOFILE","soft":77,"hard":88}],
        "capabilities":{"bounding":["CAP_KILL","CAP_NET_BIND_SERVICE"],"effective":["CAP_KILL"]}}"#;

    #[test]
    fn test_process_from_json_maps_privileges_as_config() {
        let p = process_from_json(EXEC_PROCESS.as_bytes(), false).unwrap();
        assert_eq!(
            p.user,
            User {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10, 20],
                umask: Some(63)
            }
        );
        assert!(p.no_new_privileges);
        assert_eq!(p.rlimits.len(), 1);
        assert_eq!((p.rlimits[0].soft, p.rlimits[0].hard), (77, 88));
        let caps = p.capabilities.unwrap();
        assert_eq!(caps.bounding, ["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        assert_eq!(caps.effective, ["CAP_KILL"]);
        assert!(caps.permitted.is_empty() && caps.ambient.is_empty());
    }

    #[test]
    fn test_process_from_json_without_privileges_leaves_them_unset() {
        let json = r#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        let p = process_from_json(json.as_bytes(), false).unwrap();
        assert_eq!(p.capabilities, None, "the agent gives the container's");
        assert!(p.rlimits.is_empty());
        assert!(!p.no_new_privileges);
    }

    #[test]
    fn test_process_from_json_apparmor_refused_unless_dropped() {
        let json = r#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0},
            "apparmorProfile":"cri-containerd.apparmor.d"}"#;
        let err = process_from_json(json.as_bytes(), false).unwrap_err();
        assert!(err.contains("apparmorProfile"), "{err}");
        assert!(process_from_json(json.as_bytes(), true).is_ok());
    }

    #[test]
    fn test_exec_process_config_privileges_with_overrides() {
        let config =
            default_config().replace("\"noNewPrivileges\":true", "\"noNewPrivileges\":false");
        assert!(config.contains("\"noNewPrivileges\":false"));
        let dir = bundle_with(&config);
        let request = crate::lifecycle::ExecRequest {
            args: vec!["id".into()],
            user: Some("1000".into()),
            additional_gids: vec![5],
            caps: vec!["CAP_SYS_ADMIN".into()],
            no_new_privileges: true,
            ..Default::default()
        };
        let p = exec_process(dir.path(), "c", &request).unwrap();
        assert_eq!((p.user.uid, p.user.gid), (1000, 0), "the config's gid");
        assert_eq!(p.user.additional_gids, [5]);
        assert!(p.no_new_privileges);
        assert_eq!(p.rlimits[0].kind, "RLIMIT_NOFILE");
        let caps = p.capabilities.unwrap();
        let added = |set: &[String]| set.iter().any(|c| c == "CAP_SYS_ADMIN");
        assert!(added(&caps.bounding) && added(&caps.effective) && added(&caps.permitted));
        assert!(added(&caps.ambient) && !added(&caps.inheritable), "as runc");
        assert!(
            caps.bounding.iter().any(|c| c == "CAP_KILL"),
            "the config's kept"
        );
    }

    #[test]
    fn test_exec_process_without_overrides_is_the_config_process() {
        let dir = bundle_with(&default_config());
        let request = crate::lifecycle::ExecRequest {
            args: vec!["id".into()],
            ..Default::default()
        };
        let p = exec_process(dir.path(), "c", &request).unwrap();
        let base = Bundle::load(dir.path(), "c").unwrap().spec;
        assert_eq!(p.capabilities, base.capabilities);
        assert_eq!(p.rlimits, base.rlimits);
        assert_eq!(p.no_new_privileges, base.no_new_privileges);
        assert_eq!(p.user, base.user);
    }
}
