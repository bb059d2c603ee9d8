//! The shim binary's life: `start` (spawn or reuse the pod's shim), serving, and `delete`
//! (containerd's cleanup after a shim that died), plus where a pod's files are.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, ExitSignal, Flags, StartOpts};
use husk_sandbox::pod::PodOptions;
use husk_sandbox::{HypervisorKind, VmOptions};
use tracing::{info, warn};

use crate::task::TaskService;

/// Annotation CRI puts on every container of a pod: the pod's sandbox id.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation CRI puts on every container: `sandbox` for the pod's first, else `container`.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Where the shim keeps each pod's directory (VM sockets, console log, the virtio-fs share).
const RUN_ROOT: &str = "/run/husk-shim";
/// The file in a pod's directory that names its VMM's pid.
const VMM_PID_FILE: &str = "launcher.pid";

/// The shim (the `containerd-shim` crate drives it).
pub struct HuskShim {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for HuskShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HuskShim")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl containerd_shim::Shim for HuskShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        if args.action.is_empty() {
            init_logging(args.debug);
        }
        let bundle = match args.bundle.is_empty() {
            true => std::env::current_dir().unwrap_or_default(),
            false => PathBuf::from(&args.bundle),
        };
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        spawn_server(opts).await
    }

    /// Cleans up after a shim that died: the VMM and virtiofsd died with it (they are
    /// killed when their parent dies); the pod's mounts and directory are left.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        husk_protocol::validate_id(&self.id).map_err(Error::InvalidArgument)?;
        // A bad sandbox id never made a pod (create refuses it): the container was alone.
        let annotations = Annotations::read(&self.bundle).unwrap_or_default();
        let grouping = annotations.sandbox_id.as_deref().unwrap_or(&self.id);
        let run_dir = pod_dir(&self.namespace, grouping);
        // containerd also runs `delete` after a failed create, with the pod's server alive:
        // that server owns the pod and has undone the container already.
        if !server_alive(&self.bundle) {
            if grouping == self.id {
                kill_vmm(&run_dir);
                husk_sandbox::pod::cleanup(&run_dir);
            } else {
                husk_sandbox::pod::remove_from(&run_dir, &self.id);
            }
            husk_sandbox::pod::unmount_under(&self.bundle.join("rootfs"));
            if let Some(socket) = server_socket(&self.bundle) {
                let _ = std::fs::remove_file(socket);
            }
        }
        info!(id = %self.id, "cleaned up after a dead shim");
        let mut response = DeleteResponse::new();
        response.exit_status = 128 + 9;
        response.exited_at = Some(containerd_shim::util::timestamp()?).into();
        Ok(response)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        private_run_root();
        TaskService::new(
            self.namespace.clone(),
            publisher,
            self.exit.clone(),
            ShimConfig::from_env(),
        )
    }
}

/// Starts the shim server of the container's pod, or finds it running: the containers of a
/// pod share one (grouped by the sandbox id); containerd runs `start` in the bundle.
async fn spawn_server(opts: StartOpts) -> Result<String, Error> {
    let grouping = Annotations::read(Path::new("."))
        .map_err(Error::InvalidArgument)?
        .sandbox_id
        .unwrap_or_else(|| opts.id.clone());
    let address = containerd_shim::spawn(opts, &grouping, Vec::new()).await?;
    // containerd's cleanup (and the server, on its way out) find the socket here.
    std::fs::write("address", &address).map_err(|e| Error::Other(format!("write address: {e}")))?;
    Ok(address)
}

/// The socket of `bundle`'s shim server, from the `address` file `start` wrote.
fn server_socket(bundle: &Path) -> Option<PathBuf> {
    let address = std::fs::read_to_string(bundle.join("address")).ok()?;
    let path = PathBuf::from(address.trim().trim_start_matches("unix://"));
    path.is_absolute().then_some(path)
}

/// Whether the shim server of `bundle` still answers.
fn server_alive(bundle: &Path) -> bool {
    server_socket(bundle).is_some_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
}

/// The CRI annotations of a bundle's config.json that decide its pod.
#[derive(Debug, Default, Clone)]
pub struct Annotations {
    /// [`ANNOTATION_SANDBOX_ID`].
    pub sandbox_id: Option<String>,
    /// [`ANNOTATION_CONTAINER_TYPE`] is `sandbox`.
    pub is_sandbox: bool,
}

impl Annotations {
    /// Reads `<bundle>/config.json`; none when it cannot be read (its loading reports that).
    ///
    /// # Errors
    /// A sandbox id that is not a valid container id (it names the pod's directory).
    pub fn read(bundle: &Path) -> Result<Self, String> {
        let value = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let get = |key: &str| {
            value
                .as_ref()
                .and_then(|v| v.get("annotations"))
                .and_then(|a| a.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let sandbox_id = get(ANNOTATION_SANDBOX_ID).filter(|s| !s.is_empty());
        if let Some(id) = &sandbox_id {
            husk_protocol::validate_id(id)
                .map_err(|e| format!("annotation {ANNOTATION_SANDBOX_ID}: {e}"))?;
        }
        Ok(Self {
            sandbox_id,
            is_sandbox: get(ANNOTATION_CONTAINER_TYPE).as_deref() == Some("sandbox"),
        })
    }
}

/// Makes [`RUN_ROOT`] 0700: no host user reaches a pod's directory or share.
fn private_run_root() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_ROOT)
        .and_then(|()| std::fs::set_permissions(RUN_ROOT, std::fs::Permissions::from_mode(0o700)));
    if let Err(e) = made {
        warn!(path = RUN_ROOT, error = %e, "shim run directory not made private");
    }
}

/// The directory of pod `grouping` in containerd namespace `namespace`.
pub fn pod_dir(namespace: &str, grouping: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(namespace).join(grouping)
}

/// Records the pid of the VMM's jail launcher in the pod's directory, for [`kill_vmm`] (not
/// the VMM's own: that process is the guest's once it owns the VMM, its command line too).
pub fn record_launcher_pid(run_dir: &Path, pid: Option<u32>) {
    if let Some(pid) = pid {
        if let Err(e) = std::fs::write(run_dir.join(VMM_PID_FILE), pid.to_string()) {
            warn!(error = %e, "VMM pid not recorded");
        }
    }
}

/// Kills the pod's VMM if it still runs (a shim killed before the VMM noticed) by killing its
/// jail's launcher (the jail dies with it); the pid is only trusted while that process still
/// names the pod's directory on its command line (`husk-vmm jail --spec <run_dir>/...`).
fn kill_vmm(run_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(run_dir.join(VMM_PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    // The directory as a whole path component (`/pod1/`, never a prefix of `/pod10/`).
    let mut needle = run_dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    if cmdline
        .windows(needle.len())
        .any(|w| w == needle.as_slice())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// What every pod of this shim binary gets: the guest artifacts beside the binary
/// (`../share/husk/`), the door from `HUSK_HYPERVISOR` (default `auto`), boot snapshots unless
/// `HUSK_SNAPSHOT=0`.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// How a pod's VM is made where its first bundle does not say.
    pub vm: VmOptions,
}

impl ShimConfig {
    fn from_env() -> Self {
        let hypervisor = std::env::var("HUSK_HYPERVISOR")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(HypervisorKind::Auto);
        Self {
            vm: VmOptions {
                hypervisor,
                kernel: husk_sandbox::artifacts::locate(None, "vmlinux"),
                initramfs: husk_sandbox::artifacts::locate(None, "initramfs.cpio"),
                memory_mib: husk_sandbox::DEFAULT_MEMORY_MIB,
                vcpus: husk_sandbox::DEFAULT_VCPUS,
                boot_timeout: Duration::from_secs(60),
                // `HUSK_SNAPSHOT=0` boots every pod's VM cold.
                snapshot: std::env::var("HUSK_SNAPSHOT").map_or(true, |v| v != "0"),
            },
        }
    }

    /// The options of pod `grouping` in `namespace`.
    pub fn pod(&self, namespace: &str, grouping: &str) -> PodOptions {
        PodOptions {
            vm: self.vm.clone(),
            run_dir: pod_dir(namespace, grouping),
        }
    }
}

/// Logs to the `log` FIFO containerd opened in the bundle directory (containerd copies it to
/// its own log).
fn init_logging(debug: bool) {
    // The `log` records of the rust-vmm crates and ttrpc go to tracing, rate-limited.
    let _ = husk_devices::install_log_bridge();
    let level = match debug {
        true => "debug",
        false => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match fifo {
        Ok(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with_sandbox_id(id: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "annotations": {
                ANNOTATION_SANDBOX_ID: id,
                ANNOTATION_CONTAINER_TYPE: "container",
            }
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn test_annotations_sandbox_id_dot_dot_refused() {
        for id in ["../x", "..", "a/b", ".hidden"] {
            let bundle = bundle_with_sandbox_id(id);
            let err = Annotations::read(bundle.path()).unwrap_err();
            assert!(err.contains(ANNOTATION_SANDBOX_ID), "{id}: {err}");
        }
        let bundle = bundle_with_sandbox_id("pod-1");
        let read = Annotations::read(bundle.path()).unwrap();
        assert_eq!(read.sandbox_id.as_deref(), Some("pod-1"));
        assert!(!read.is_sandbox);
    }
}
