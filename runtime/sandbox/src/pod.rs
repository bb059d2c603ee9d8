//! A pod: one VM that holds several containers, each created in it by the agent (the
//! containerd shim's sandbox; a plain container is a pod of one).
//!
//! The VM shares one host directory with virtio-fs, [`POD_TAG`]. A container added to the pod
//! gets `<share>/<id>/rootfs` (a bind of its bundle's rootfs) and `<share>/<id>/binds/<tag>`
//! (binds of its bind-mount sources) under it, and its spec is rewritten to use them, so that
//! containers can come and go while the VM runs. virtiofsd is confined to the share by a
//! chroot in the host's mount namespace: the binds made after it started are visible to it.
//! The guest can write the share: [`share`] assembles it without resolving a path in it.

mod share;
#[cfg(feature = "fuzzing")]
pub(crate) use share::unescape_mountinfo;

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_hypervisor::{new_door, Export, FsShare, VmConfig};
use husk_protocol::{BindSource, Rootfs as AgentRootfs};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::agent::AgentClient;
use crate::bundle::{Bundle, Rootfs};
use crate::pod_net::PodNetwork;
use crate::run::VmOptions;
use crate::SandboxError;

use share::{detach_all, PodShare};
pub use share::{mount_points_under, remove_from};

/// virtio-fs tag of the pod's share.
pub const POD_TAG: &str = "pod";

/// How a pod's VM is made; its size comes from the first container's bundle.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// Door, guest artifacts and size where the bundle does not say.
    pub vm: VmOptions,
    /// The pod's own directory (VM sockets, console log, the share); made by [`PodVm::boot`],
    /// removed by [`PodVm::shutdown`] or [`cleanup`].
    pub run_dir: PathBuf,
}

/// A running pod VM.
#[derive(Debug)]
pub struct PodVm {
    /// The VM's vsock socket: each request opens its own connection to the agent, so that
    /// no lock is held while a guest takes its time (every request has a deadline).
    vsock: PathBuf,
    /// The pod's network wired to the VM, undone at shutdown.
    network: Option<PodNetwork>,
    vmm_pid: Option<u32>,
    launcher_pid: Option<u32>,
    run_dir: PathBuf,
    share: PodShare,
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    ended: watch::Receiver<Option<String>>,
}

impl PodVm {
    /// Boots the pod's VM, sized by `first` (the sandbox container's bundle), and waits for
    /// its agent.
    ///
    /// # Errors
    /// The door cannot start the VM or the agent does not answer; nothing is left running.
    pub async fn boot(opts: &PodOptions, first: &Bundle) -> Result<Self, SandboxError> {
        let share = PodShare::create(&opts.run_dir).inspect_err(|_| cleanup(&opts.run_dir))?;
        let (memory_mib, vcpus) = crate::run::vm_size(first, &opts.vm);
        let network = match &first.pod_netns {
            Some(netns) => PodNetwork::wire(netns).inspect_err(|_| cleanup(&opts.run_dir))?,
            None => None,
        };
        let config = VmConfig {
            kernel: opts.vm.kernel.clone(),
            initramfs: opts.vm.initramfs.clone(),
            memory_mib,
            vcpus,
            shares: vec![FsShare {
                tag: POD_TAG.to_owned(),
                export: Export::Dir {
                    path: share.path().to_owned(),
                    read_only: false,
                },
                keep_cache: false,
            }],
            disks: Vec::new(),
            net: network.as_ref().map(|n| n.device.clone()),
            run_dir: opts.run_dir.clone(),
            // The sandbox container's cgroup holds the whole pod's VM.
            cgroup: crate::run::host_cgroup(first, memory_mib),
            snapshot: crate::run::snapshot_allowed(&opts.vm, first),
            ready_port: husk_protocol::AGENT_PORT,
            save_port: Some(husk_protocol::SAVE_PORT),
        };
        let kind = first.vm.hypervisor.unwrap_or(opts.vm.hypervisor);
        let undo = |network: &Option<PodNetwork>| {
            if let Some(n) = network {
                n.unwire();
            }
            cleanup(&opts.run_dir);
        };
        let mut vm = new_door(kind, config)
            .map_err(SandboxError::from)
            .inspect_err(|_| undo(&network))?;
        let booted = async {
            vm.start().await?;
            let mut agent = crate::run::boot(vm.as_mut(), opts.vm.boot_timeout).await?;
            if let Some(n) = &network {
                agent.configure_network(&n.network).await?;
            }
            Ok::<_, SandboxError>(agent)
        }
        .await;
        let agent = match booted {
            Ok(agent) => agent,
            Err(e) => {
                let _ = vm.stop().await;
                undo(&network);
                return Err(e);
            }
        };
        let (vmm_pid, launcher_pid) = (vm.pid(), vm.launcher_pid());
        info!(memory_mib, vcpus, ?vmm_pid, "pod VM up");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(async move {
            let reason = tokio::select! {
                exit = vm.wait() => crate::run::exit_reason(vm.as_ref(), exit),
                _ = stop_rx => "stopped".to_owned(),
            };
            let _ = vm.stop().await;
            debug!(%reason, "pod VM ended");
            let _ = ended_tx.send(Some(reason));
        });
        Ok(Self {
            vsock: agent.uds().to_owned(),
            network,
            vmm_pid,
            launcher_pid,
            run_dir: opts.run_dir.clone(),
            share,
            stop: std::sync::Mutex::new(Some(stop_tx)),
            ended,
        })
    }

    /// The VMM's host pid.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm_pid
    }

    /// The host pid of the VMM's jail launcher (the door's child): the one to signal.
    pub fn launcher_pid(&self) -> Option<u32> {
        self.launcher_pid
    }

    /// A new control connection to the agent, for one request or a wait for an exit.
    ///
    /// # Errors
    /// The agent cannot be reached or does not answer the handshake in time.
    pub async fn agent(&self) -> Result<AgentClient, SandboxError> {
        AgentClient::open(&self.vsock).await
    }

    /// Resolves when the VM has ended, with why.
    pub async fn ended(&self) -> String {
        let mut ended = self.ended.clone();
        let reason = match ended.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "VM watcher gone".to_owned(),
        };
        reason
    }

    /// Whether the VM has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Binds `bundle`'s rootfs and bind-mount sources into the share and rewrites its spec to
    /// use them, then has the agent create the container (its process waits for start).
    ///
    /// # Errors
    /// A disk-image rootfs (not supported in a pod), a bind that fails, or the agent's error;
    /// the binds are undone.
    pub async fn create(&self, bundle: &mut Bundle) -> Result<(), SandboxError> {
        let id = bundle.spec.id.clone();
        let placed = self.place(bundle);
        let result = match placed {
            Ok(()) => async { self.agent().await?.create(&bundle.spec).await }.await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.remove(&id);
        }
        result
    }

    fn place(&self, bundle: &mut Bundle) -> Result<(), SandboxError> {
        let id = bundle.spec.id.clone();
        let Rootfs::Dir(rootfs) = &bundle.rootfs else {
            return Err(SandboxError::InvalidConfig {
                path: bundle.dir.join("config.json"),
                reason: "a disk-image rootfs cannot join a pod; use a directory".into(),
            });
        };
        bundle.prepare_mountpoints()?;
        let read_only = bundle.spec.rootfs_readonly;
        self.share
            .place(&id, rootfs, read_only, &bundle.bind_entries)?;
        bundle.spec.rootfs = AgentRootfs::VirtioFs {
            tag: POD_TAG.to_owned(),
            path: Some(format!("{id}/rootfs")),
        };
        for m in &mut bundle.spec.mounts {
            if let Some(source) = &mut m.source {
                // The binds share is now `<id>/binds` in the pod's.
                let binds = format!("{id}/{}", source.tag);
                let path = match source.path.take() {
                    Some(path) => format!("{binds}/{path}"),
                    None => binds,
                };
                *source = BindSource {
                    path: Some(path),
                    tag: POD_TAG.to_owned(),
                    file: source.file.take(),
                };
            }
        }
        Ok(())
    }

    /// Undoes the binds of container `id` (after the agent let go of it).
    pub fn remove(&self, id: &str) {
        self.share.remove(id);
    }

    /// Ends the pod: with `waited` (every container of the pod exited and its exit was
    /// waited for, so the agent removed its cgroup and wrote back what its file systems held)
    /// the VMM at once; else, with containers that may still run, after the guest powered off (the
    /// agent syncs its file systems). Then removes the pod's directory with every bind in it.
    pub async fn shutdown(&self, waited: bool) {
        if !waited && !self.has_ended() {
            let powered_off = async {
                self.agent().await?.shutdown().await?;
                let _ = tokio::time::timeout(POWEROFF_GRACE, self.ended()).await;
                Ok::<_, SandboxError>(())
            };
            match tokio::time::timeout(SHUTDOWN_PATIENCE, powered_off).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "agent gone before shutdown"),
                Err(_) => warn!("the agent did not power the VM off in time; ending it"),
            }
        }
        self.end_vm().await;
        if let Some(n) = &self.network {
            n.unwire();
        }
        cleanup(&self.run_dir);
    }

    /// Ends the VM now, without its agent (one that does not answer), and waits up to
    /// [`STOP_GRACE`] for the door to have ended it; the pod's containers see it end.
    pub async fn end_vm(&self) {
        if let Some(stop) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(STOP_GRACE, self.ended()).await;
    }
}

/// How long [`PodVm::shutdown`] lets the agent take to power the guest off before it ends
/// the VM itself.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(10);
/// How long a guest may take to power off after the agent's shutdown.
const POWEROFF_GRACE: Duration = Duration::from_secs(2);
/// How long the door may take to end the VMM and its helpers.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Removes a pod's directory `run_dir` with every mount under it: after [`PodVm::shutdown`],
/// or for a pod whose owner died (the VMM and its helpers die with their owner). Nothing is
/// deleted while a mount below it remains.
pub fn cleanup(run_dir: &Path) {
    if !detach_all(run_dir) {
        warn!(dir = %run_dir.display(), "pod directory still has mounts: not removed");
        return;
    }
    if let Err(e) = crate::state_dir::remove_run_dir(run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %run_dir.display(), error = %e, "pod directory not removed");
        }
    }
    // The directory of the pod's group (a containerd namespace) goes with its last pod.
    if let Some(parent) = run_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Detaches every mount at or below `dir`, deepest first, without following a symlink.
pub fn unmount_under(dir: &Path) {
    detach_all(dir);
}
