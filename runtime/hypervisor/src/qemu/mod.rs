//! The QEMU door: `qemu-system-x86_64 -M microvm,acpi=off` with direct kernel boot.
//!
//! Guest memory is a shared memfd so that virtiofsd (one per share) can map it over
//! vhost-user. The agent's channel is a virtio-serial port whose host side is the serial relay
//! (`husk-vmm serial-relay`, see `husk_vmm::relay`): QEMU cannot save a VM with a vhost-user
//! vsock device, and the relay serves the same hybrid vsock socket the vsock device does. QEMU
//! appends the virtio-mmio devices to the kernel command line itself when ACPI is off. QEMU
//! and the relay run jailed ([`crate::jail`]), QEMU under its own `-sandbox` too. All helpers die with the thread that spawned them (PR_SET_PDEATHSIG), so a
//! killed husk leaves no VM behind.

mod cmdline;
mod qmp;
mod snapshot;
mod tsc;

pub use snapshot::{qemu_major, MIN_QEMU_MAJOR};

use std::path::{Path, PathBuf};
use std::time::Instant;

use husk_vmm::jail::JailBind;
use tokio::process::Child;
use tracing::{debug, info};

use cmdline::SnapshotArgs;
pub use cmdline::{Accel, KERNEL_CMDLINE};
use qmp::Qmp;

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::helpers::{self, Virtiofsd};
use crate::jail::{self, Jail};
use crate::{find_program, Hypervisor, HypervisorError, VmConfig, VmExit};

/// QEMU binary the door runs.
const QEMU: &str = "qemu-system-x86_64";
/// husk's VMM binary: the jail launcher and the serial relay.
const HUSK_VMM: &str = "husk-vmm";

/// A VM run by QEMU.
#[derive(Debug)]
pub struct QemuDoor {
    config: VmConfig,
    qemu: PathBuf,
    vmm: PathBuf,
    virtiofsd: Option<PathBuf>,
    accel: Accel,
    relay: Option<Child>,
    fs: Vec<Virtiofsd>,
    child: Option<Child>,
    cgroup: Option<crate::cgroup::HostCgroup>,
    /// Bounds the console and qemu.log while QEMU runs (the guest writes both).
    console_cap: Option<ConsoleCap>,
    /// The connection that showed the restored guest answering
    /// ([`Hypervisor::take_ready_connection`]).
    ready: Option<tokio::net::UnixStream>,
}

impl QemuDoor {
    /// Checks that QEMU, virtiofsd (when there are shares), the kernel and the initramfs exist.
    ///
    /// # Errors
    /// [`HypervisorError::ProgramNotFound`] or [`HypervisorError::MissingFile`].
    pub fn new(config: VmConfig) -> Result<Self, HypervisorError> {
        let qemu = find_program(QEMU).ok_or(HypervisorError::ProgramNotFound {
            program: QEMU,
            hint: "install it with `apt-get install qemu-system-x86`",
        })?;
        let vmm =
            helpers::find_beside_or_in_path(HUSK_VMM).ok_or(HypervisorError::ProgramNotFound {
                program: HUSK_VMM,
                hint: "it is built and installed with husk (make build)",
            })?;
        let virtiofsd = helpers::require_inputs(&config)?;
        Ok(Self {
            config,
            qemu,
            vmm,
            virtiofsd,
            accel: choose_accel(),
            relay: None,
            fs: Vec::new(),
            child: None,
            cgroup: None,
            console_cap: None,
            ready: None,
        })
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// A file in the directory the VM's jailed processes may write ([`crate::vm_dir`]).
    fn vm_path(&self, name: &str) -> PathBuf {
        crate::vm_dir(&self.config.run_dir).join(name)
    }

    fn start_virtiofsd(&mut self) -> Result<Vec<PathBuf>, HypervisorError> {
        let Some(binary) = self.virtiofsd.clone() else {
            return Ok(Vec::new());
        };
        let mut sockets = Vec::new();
        for (i, share) in self.config.shares.clone().into_iter().enumerate() {
            let socket = self.vm_path(&format!("fs{i}.sock"));
            let staging = self.run_path(&format!("fs{i}.stage"));
            let log = self.run_path(&format!("virtiofsd{i}.log"));
            self.fs
                .push(Virtiofsd::start(&binary, &share, &socket, &staging, &log)?);
            sockets.push(socket);
        }
        Ok(sockets)
    }
}

/// `HUSK_QEMU_ACCEL=kvm|tcg` forces an accelerator. Otherwise KVM where the host's KVM passes
/// the capability probe (a few milliseconds), TCG where it does not: a restricted nested KVM
/// (PVM) runs a Linux guest far slower than TCG or not at all, and `/dev/kvm` being present
/// does not tell the two apart.
fn choose_accel() -> Accel {
    match std::env::var("HUSK_QEMU_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ if husk_vmm::probe::probe().passed => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// How `child` ended (never resolves without one).
async fn wait_child(child: Option<&mut tokio::process::Child>) -> String {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

/// What a restore brings to [`QemuDoor::launch`].
struct Restore<'a> {
    /// The snapshot's directory.
    snapshot: &'a Path,
    /// The memfd its memory is being copied into ([`MemoryCopy`]), passed to QEMU.
    memory: std::fs::File,
}

/// The task copying a snapshot's memory, ended (and its `husk-vmm copy-memory` killed) if the
/// restore fails before it is awaited.
struct MemoryCopy(tokio::task::JoinHandle<Result<(), HypervisorError>>);

impl Drop for MemoryCopy {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl QemuDoor {
    /// Starts virtiofsd for each share, the serial relay and QEMU: a cold boot, or with
    /// `snapshot` a boot to be saved or a restore (`from`: the snapshot, whose state file is
    /// bound read-only into QEMU's jail, and the memfd its memory is being copied into, passed
    /// to QEMU, which reads none of it before it loads the saved state). QEMU starts once the
    /// relay listens: virtiofsd's socket listens before virtiofsd runs. With `snapshot`,
    /// QEMU's monitor is returned, in command mode, its calls bounded by `deadline`.
    async fn launch(
        &mut self,
        snapshot: Option<SnapshotArgs>,
        from: Option<Restore<'_>>,
        deadline: Instant,
    ) -> Result<Option<Qmp>, HypervisorError> {
        let run_dir = self.config.run_dir.clone();
        // Measured while the relay and virtiofsd start; a restored guest has its own.
        let boots = !matches!(snapshot, Some(SnapshotArgs::Restore));
        let tsc_khz =
            (boots && self.accel == Accel::Tcg).then(|| tokio::task::spawn_blocking(tsc::host_khz));
        let serial = self.vm_path("serial.sock");
        let argv = vec![
            jail::arg(&self.vmm)?,
            "serial-relay".into(),
            "--socket".into(),
            jail::arg(&serial)?,
            "--uds".into(),
            jail::arg(&self.vsock_path())?,
        ];
        let log = self.vm_path("relay.log");
        let jail = Jail {
            cgroup_procs: crate::cgroup::procs_files(self.cgroup.as_ref()),
            ..Jail::default()
        };
        let fs = self.start_virtiofsd()?;
        let mut relay = jail::spawn(&self.vmm, "relay", jail, argv, &run_dir, &log)?;
        let timeout = std::time::Duration::from_secs(10);
        for socket in [&serial, &self.vsock_path()] {
            helpers::wait_for_socket("relay", &mut relay, socket, &log, timeout).await?;
        }
        self.relay = Some(relay);
        let (from, memory) = match from {
            Some(Restore { snapshot, memory }) => (Some(snapshot), Some(memory)),
            None => (None, None),
        };
        let tsc_khz = match tsc_khz {
            Some(measuring) => measuring.await.ok().flatten(),
            None => None,
        };
        let mut argv = vec![jail::arg(&self.qemu)?];
        let args = cmdline::args(
            &self.config,
            self.accel,
            &self.console_path(),
            snapshot.as_ref(),
            tsc_khz,
        );
        for a in args {
            argv.push(a.into_string().map_err(|a| HypervisorError::Spawn {
                program: QEMU,
                source: std::io::Error::other(format!("{a:?} is not UTF-8")),
            })?);
        }
        debug!(qemu = %self.qemu.display(), ?argv, "starting QEMU");
        let mut binds = vec![
            JailBind::ro(&self.config.kernel),
            JailBind::ro(&self.config.initramfs),
        ];
        // The saved state only: QEMU reads it; the saved memory it never sees (its copy is
        // passed).
        binds.extend(from.map(|dir| JailBind::ro(dir.join(husk_vmm::snapshot::STATE_FILE))));
        let disks = self.config.disks.iter().filter(|d| !d.is_unplugged());
        binds.extend(disks.map(|d| JailBind {
            path: d.path.clone(),
            writable: !d.read_only,
        }));
        if self.accel == Accel::Kvm {
            binds.push(JailBind::ro("/dev/kvm"));
        }
        let mut connect = vec![serial];
        connect.extend(fs);
        // QEMU's monitor: the jail connects it to us, like the other sockets.
        let monitor = match snapshot {
            Some(_) => {
                let path = self.vm_path("qmp.sock");
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path).map_err(|source| {
                    HypervisorError::Spawn {
                        program: QEMU,
                        source,
                    }
                })?;
                connect.push(path);
                Some(listener)
            }
            None => None,
        };
        let plugged = self.config.net.as_ref().filter(|n| !n.is_unplugged());
        let jail = Jail {
            binds,
            cgroup_procs: crate::cgroup::procs_files(self.cgroup.as_ref()),
            netns: plugged.map(|n| n.netns.clone()),
            connect,
            tap: plugged.map(|n| n.tap.clone()),
            pass: memory.into_iter().map(std::os::fd::OwnedFd::from).collect(),
            allow_connect: false,
        };
        let log = self.vm_path("qemu.log");
        let child = jail::spawn(&self.vmm, QEMU, jail, argv, &run_dir, &log)?;
        info!(pid = child.id(), accel = ?self.accel, "QEMU started");
        self.child = Some(child);
        let capped = [
            self.console_path(),
            self.vm_path("qemu.log"),
            self.vm_path("relay.log"),
        ];
        self.console_cap = Some(ConsoleCap::start(&capped, CONSOLE_CAP));
        let Some(listener) = monitor else {
            return Ok(None);
        };
        let monitor_err = |why: String| HypervisorError::Spawn {
            program: QEMU,
            source: std::io::Error::other(why),
        };
        // QEMU (or its jail, connecting QEMU's sockets) may end first: a virtiofsd that failed
        // leaves nothing to connect to.
        let accepted = tokio::select! {
            accepted = tokio::time::timeout_at(deadline.into(), listener.accept()) => accepted
                .map_err(|_| monitor_err("its monitor was not connected in time".into()))
                .and_then(|a| a.map_err(|e| monitor_err(e.to_string()))),
            status = wait_child(self.child.as_mut()) => {
                Err(monitor_err(format!("it exited with {status} before its monitor connected")))
            }
        };
        let accepted = accepted.map_err(|e| helpers::failed_helper(&mut self.fs).unwrap_or(e))?;
        let _ = std::fs::remove_file(self.vm_path("qmp.sock"));
        let qmp = Qmp::handshake(accepted.0, deadline)
            .await
            .map_err(monitor_err)?;
        Ok(Some(qmp))
    }

    /// Stops QEMU, virtiofsd and the relay (the cgroup stays).
    async fn halt(&mut self) -> Result<(), HypervisorError> {
        helpers::stop_vm(self.child.take(), &mut self.fs).await?;
        if let Some(mut relay) = self.relay.take() {
            let _ = relay.start_kill();
            let _ = relay.wait().await;
            for socket in ["serial.sock", "vsock.sock", "qmp.sock"] {
                let _ = std::fs::remove_file(self.vm_path(socket));
            }
        }
        self.console_cap = None;
        self.ready = None;
        Ok(())
    }

    /// Restores the VM from the snapshot `dir` (QEMU loads the saved state; the memory is a
    /// copy of the saved memory, in a memfd) and waits until its guest answers on
    /// [`VmConfig::ready_port`].
    async fn restore(&mut self, dir: &Path) -> Result<(), String> {
        let deadline = Instant::now() + crate::snapshot::RESTORE_TIMEOUT;
        let state = snapshot::file_uri(&dir.join(husk_vmm::snapshot::STATE_FILE))?;
        let memory_err = |e: &dyn std::fmt::Display| {
            HypervisorError::SnapshotMemory(std::io::Error::other(e.to_string())).with_causes()
        };
        let (source, memory) =
            husk_vmm::snapshot::memory_copy_files(&dir.join(husk_vmm::snapshot::MEMORY_FILE))
                .map_err(|e| memory_err(&e))?;
        let copying = memory.try_clone().map_err(|e| memory_err(&e))?;
        let mut memory_copy = MemoryCopy(tokio::spawn(jail::copy_memory(
            self.vmm.clone(),
            source,
            copying,
            crate::cgroup::procs_files(self.cgroup.as_ref()),
            deadline,
        )));
        let from = Restore {
            snapshot: dir,
            memory,
        };
        let mut qmp = self
            .launch(Some(SnapshotArgs::Restore), Some(from), deadline)
            .await
            .map_err(|e| e.with_causes())?
            .ok_or("QEMU has no monitor")?;
        // The saved state refers to guest memory (the devices' queues): the copy comes first.
        (&mut memory_copy.0)
            .await
            .unwrap_or_else(|e| Err(HypervisorError::SnapshotMemory(std::io::Error::other(e))))
            .map_err(|e| e.with_causes())?;
        qmp.ignore_shared_memory().await?;
        qmp.execute("migrate-incoming", serde_json::json!({ "uri": state }))
            .await?;
        qmp.migration_done().await?;
        qmp.execute("cont", serde_json::json!({})).await?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.ready = Some(self.wait_ready(timeout).await?);
        Ok(())
    }

    /// Waits until the guest answers on [`VmConfig::ready_port`], or QEMU ends; returns the
    /// connection it accepted.
    async fn wait_ready(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<tokio::net::UnixStream, String> {
        let (uds, port) = (self.vsock_path(), self.config.ready_port);
        let ready = crate::snapshot::wait_ready(self.child.as_mut(), &uds, port, timeout).await;
        ready.map_err(|reason| format!("{reason}; {}", self.diagnostics()))
    }
}

#[async_trait::async_trait]
impl Hypervisor for QemuDoor {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        jail::make_vm_dir(&self.config.run_dir)?;
        self.cgroup = jail::host_cgroup(&self.config)?;
        if let Some((store, key, dir)) = snapshot::for_boot(self).await {
            let restored = self.restore(&dir).await;
            // A virtiofsd that failed is no fault of the snapshot, and would fail a cold boot.
            if let (Err(_), Some(e)) = (&restored, helpers::failed_helper(&mut self.fs)) {
                self.halt().await?;
                return Err(e);
            }
            if crate::snapshot::settle_restore(&store, &key, restored) {
                return Ok(());
            }
            self.halt().await?;
        }
        self.launch(None, None, Instant::now()).await.map(drop)
    }

    fn take_ready_connection(&mut self) -> Option<tokio::net::UnixStream> {
        self.ready.take()
    }

    fn vsock_path(&self) -> PathBuf {
        crate::vsock_path(&self.config.run_dir)
    }

    fn console_path(&self) -> PathBuf {
        self.vm_path("console.log")
    }

    fn diagnostics(&self) -> String {
        let console = crate::tail_lines(&self.console_path(), 8).join(" | ");
        let qemu = crate::tail_lines(&self.vm_path("qemu.log"), 3).join(" | ");
        match qemu.is_empty() {
            true => format!("last console lines: {console}"),
            false => format!("last console lines: {console}; qemu: {qemu}"),
        }
    }

    fn pid(&self) -> Option<u32> {
        crate::jail::jailed_pid(self.launcher_pid())
    }

    fn launcher_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn sentinel(&self) -> Result<crate::Sentinel, HypervisorError> {
        let procs = crate::cgroup::procs_files(self.cgroup.as_ref());
        jail::sentinel(&self.vmm, self.pid(), self.launcher_pid(), &procs).await
    }

    async fn wait(&mut self) -> Result<VmExit, HypervisorError> {
        helpers::wait_vm(self.child.as_mut(), &mut self.fs).await
    }

    async fn stop(&mut self) -> Result<(), HypervisorError> {
        self.halt().await?;
        jail::remove_cgroup(self.cgroup.take()).await;
        Ok(())
    }
}
