//! A pod: one VM that holds several containers, each created in it by the agent (the
//! containerd shim's sandbox; a plain container is a pod of one).
//!
//! The VM shares one host directory with virtio-fs, [`POD_TAG`]. A container added to the pod
//! gets `<share>/<id>/rootfs` (a bind of its bundle's rootfs) and `<share>/<id>/binds/<tag>`
//! (binds of its bind-mount sources) under it, and its spec is rewritten to use them, so that
//! containers can come and go while the VM runs. virtiofsd is confined to the share by a
//! chroot in the host's mount namespace: the binds made after it started are visible to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_hypervisor::{new_door, FsShare, VmConfig};
use husk_protocol::{BindSource, Rootfs as AgentRootfs};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::agent::AgentClient;
use crate::bundle::{Bundle, Rootfs};
use crate::pod_net::PodNetwork;
use crate::run::VmOptions;
use crate::SandboxError;

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
    run_dir: PathBuf,
    share: PathBuf,
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
        let share = opts.run_dir.join("share");
        std::fs::create_dir_all(&share).map_err(|source| SandboxError::StateDir {
            path: share.clone(),
            source,
        })?;
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
                host_dir: share.clone(),
            }],
            disks: Vec::new(),
            net: network.as_ref().map(|n| n.device.clone()),
            run_dir: opts.run_dir.clone(),
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
        let vmm_pid = vm.pid();
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
        let base = self.share.join(&id);
        bind(rootfs, &base.join("rootfs"))?;
        bundle.spec.rootfs = AgentRootfs::VirtioFs {
            tag: POD_TAG.to_owned(),
            path: Some(format!("{id}/rootfs")),
        };
        for share in &bundle.bind_shares {
            bind(&share.dir, &base.join("binds").join(&share.tag))?;
        }
        for m in &mut bundle.spec.mounts {
            if let Some(source) = &mut m.source {
                *source = BindSource {
                    path: Some(format!("{id}/binds/{}", source.tag)),
                    tag: POD_TAG.to_owned(),
                    file: source.file.take(),
                };
            }
        }
        Ok(())
    }

    /// Undoes the binds of container `id` (after the agent let go of it).
    pub fn remove(&self, id: &str) {
        let base = self.share.join(id);
        unmount_under(&base);
        let _ = std::fs::remove_dir_all(&base);
    }

    /// Powers the guest off (the agent syncs its file systems), ends the VMM and removes the
    /// pod's directory with every bind in it.
    pub async fn shutdown(&self) {
        if !self.has_ended() {
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

/// Bind-mounts `from` on `to` (made as a directory), read-write; the container's own mount
/// flags apply in the guest.
fn bind(from: &Path, to: &Path) -> Result<(), SandboxError> {
    let err = |source: std::io::Error| SandboxError::StateDir {
        path: to.to_owned(),
        source,
    };
    std::fs::create_dir_all(to).map_err(err)?;
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err(std::io::Error::from(e)))
}

/// Removes a pod's directory `run_dir` with every mount under it: after [`PodVm::shutdown`],
/// or for a pod whose owner died (the VMM and its helpers die with their owner).
pub fn cleanup(run_dir: &Path) {
    unmount_under(run_dir);
    if let Err(e) = std::fs::remove_dir_all(run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %run_dir.display(), error = %e, "pod directory not removed");
        }
    }
    // The directory of the pod's group (a containerd namespace) goes with its last pod.
    if let Some(parent) = run_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mut points = mount_points_under(dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
            warn!(mount = %point.display(), error = %e, "unmount failed");
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_unescape_mountinfo_space_and_backslash() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/bad\04"), r"/bad\04");
    }
}
