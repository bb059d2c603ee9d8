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
//! `process.apparmorProfile`, `linux.devices`, ...) is an error, never silently ignored;
//! README.md lists every field and the few ignored ones.

mod binds;
mod linux;
mod process;
mod resources;
mod seccomp;

use std::path::{Path, PathBuf};

use husk_protocol::{ContainerSpec, Rootfs as AgentRootfs, User};
use oci_spec::runtime::Spec;

pub use binds::BindShare;

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

/// A bundle ready to run.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The rootfs (absolute path).
    pub rootfs: Rootfs,
    /// What the agent builds.
    pub spec: ContainerSpec,
    /// Host directories bind mounts need, each shared with virtio-fs.
    pub bind_shares: Vec<BindShare>,
}

impl Bundle {
    /// Reads and checks `<dir>/config.json` for container `id`.
    ///
    /// # Errors
    /// [`SandboxError::ReadConfig`], [`SandboxError::InvalidConfig`] or
    /// [`SandboxError::MissingRootfs`].
    pub fn load(dir: &Path, id: &str) -> Result<Self, SandboxError> {
        let path = dir.join("config.json");
        let spec = Spec::load(&path).map_err(|source| SandboxError::ReadConfig {
            path: path.clone(),
            source,
        })?;
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
        let user = process.user();
        let attrs = process::attrs(process).map_err(|reason| invalid(&reason))?;
        let linux = linux::attrs(&spec, dir).map_err(|reason| invalid(&reason))?;
        let spec = ContainerSpec {
            id: id.to_owned(),
            rootfs: agent_rootfs,
            rootfs_readonly: root.readonly().unwrap_or(false),
            hostname: spec.hostname().clone(),
            args: attrs.args,
            env: process.env().clone().unwrap_or_default(),
            cwd: process.cwd().to_string_lossy().into_owned(),
            user: User {
                uid: user.uid(),
                gid: user.gid(),
                additional_gids: user.additional_gids().clone().unwrap_or_default(),
                umask: user.umask(),
            },
            rlimits: attrs.rlimits,
            no_new_privileges: attrs.no_new_privileges,
            oom_score_adj: attrs.oom_score_adj,
            capabilities: attrs.capabilities,
            mounts: linux.mounts,
            masked_paths: linux.masked_paths,
            readonly_paths: linux.readonly_paths,
            sysctl: linux.sysctl,
            namespaces: linux.namespaces,
            resources: linux.resources,
            seccomp: linux.seccomp,
            uid_mappings: linux.uid_mappings,
            gid_mappings: linux.gid_mappings,
        };
        spec.validate().map_err(|reason| invalid(&reason))?;
        Ok(Self {
            rootfs,
            spec,
            bind_shares: linux.bind_shares,
        })
    }
}

/// The rootfs at `path` (relative to the bundle `dir`): a directory or a disk image file.
fn resolve_rootfs(dir: &Path, path: &Path) -> Result<(Rootfs, AgentRootfs), SandboxError> {
    let rootfs = match path.is_absolute() {
        true => path.to_owned(),
        false => dir.join(path),
    };
    if rootfs.is_dir() {
        let tag = ROOTFS_TAG.to_owned();
        Ok((Rootfs::Dir(rootfs), AgentRootfs::VirtioFs { tag }))
    } else if rootfs.is_file() {
        let serial = ROOTFS_SERIAL.to_owned();
        Ok((Rootfs::Image(rootfs), AgentRootfs::Block { serial }))
    } else {
        Err(SandboxError::MissingRootfs { path: rootfs })
    }
}

#[cfg(test)]
mod tests {
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
    fn test_load_terminal_rejected() {
        let config = default_config().replace("\"terminal\":false", "\"terminal\":true");
        assert!(config.contains("\"terminal\":true"));
        let dir = bundle_with(&config);
        assert!(matches!(
            Bundle::load(dir.path(), "c"),
            Err(SandboxError::InvalidConfig { .. })
        ));
    }
}
