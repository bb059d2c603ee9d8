//! The built-in VMM door: the VM is a `husk-vmm` process (runtime/vmm) booting the same kernel
//! and initramfs on KVM, with the vsock, block and network devices in process and virtio-fs
//! from virtiofsd over vhost-user, exactly as the QEMU door shares the rootfs. A network
//! device's tap is opened by the jail in the engine's network namespace, as for QEMU.
//!
//! A VM starts from its boot snapshot ([`crate::snapshot`]) where it has one: husk-vmm rebuilds
//! the saved guest (its agent already listening) instead of booting a kernel. The first VM of
//! a shape makes the snapshot ([`snapshot`]), and a restore that fails (a damaged snapshot, a
//! guest that does not answer) is stopped and booted cold, with one log line saying why.

mod snapshot;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use husk_vmm::document::{DiskDevice, FsDevice, NetDevice, SnapshotMode, VmmDocument};
use husk_vmm::jail::JailBind;
use tokio::process::Child;
use tracing::{debug, info};

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::helpers::{self, Virtiofsd};
use crate::jail::{self, Jail};
use crate::qemu::KERNEL_CMDLINE;
use crate::{Hypervisor, HypervisorError, VmConfig, VmExit};

const HUSK_VMM: &str = "husk-vmm";

/// A VM run by the built-in VMM.
#[derive(Debug)]
pub struct KvmDoor {
    config: VmConfig,
    vmm: PathBuf,
    virtiofsd: Option<PathBuf>,
    fs: Vec<Virtiofsd>,
    child: Option<Child>,
    cgroup: Option<crate::cgroup::HostCgroup>,
    /// Bounds vmm.log while husk-vmm runs (husk-vmm caps the console file itself).
    log_cap: Option<ConsoleCap>,
    /// The connection that showed the restored guest answering
    /// ([`Hypervisor::take_ready_connection`]).
    ready: Option<tokio::net::UnixStream>,
}

impl KvmDoor {
    /// The VM's network device, unless it is unplugged (this door saves no network device,
    /// so an unplugged one, from `husk snapshot prepare`, is simply left out; an unplugged
    /// disk is an empty file, see `unplugged_disk`).
    fn plugged_net(&self) -> Option<&crate::NetDevice> {
        self.config.net.as_ref().filter(|n| !n.is_unplugged())
    }

    /// Checks that husk-vmm, virtiofsd (if there are shares), kernel and initramfs exist.
    ///
    /// # Errors
    /// The first missing piece.
    pub fn new(config: VmConfig) -> Result<Self, HypervisorError> {
        let vmm =
            helpers::find_beside_or_in_path(HUSK_VMM).ok_or(HypervisorError::ProgramNotFound {
                program: HUSK_VMM,
                hint: "it is built and installed with husk (make build)",
            })?;
        let virtiofsd = helpers::require_inputs(&config)?;
        Ok(Self {
            config,
            vmm,
            virtiofsd,
            fs: Vec::new(),
            child: None,
            cgroup: None,
            log_cap: None,
            ready: None,
        })
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// The backing file of an unplugged disk ([`crate::Disk::unplugged`]): an empty file of
    /// this VM's own, in its run directory (out of the jail, which gets the file alone).
    fn unplugged_disk(&self, serial: &str) -> Result<PathBuf, HypervisorError> {
        let path = self.run_path(&format!("unplugged-{serial}.img"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| HypervisorError::EmptyDisk {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// A file in the directory the VM's jailed processes may write ([`crate::vm_dir`]).
    fn vm_path(&self, name: &str) -> PathBuf {
        crate::vm_dir(&self.config.run_dir).join(name)
    }

    /// Starts virtiofsd for each share and husk-vmm with its document: a boot, or with `mode`
    /// a boot to be saved or a restore (the snapshot bound read-only into its jail).
    async fn launch(&mut self, mode: Option<SnapshotMode>) -> Result<(), HypervisorError> {
        let mut doc = VmmDocument {
            kernel: self.config.kernel.clone(),
            initramfs: self.config.initramfs.clone(),
            console: self.console_path(),
            vsock_uds: self.vsock_path(),
            fs: Vec::new(),
            disks: Vec::new(),
            // No sockets are passed: the tap is the first passed descriptor.
            net: self.plugged_net().map(|net| NetDevice {
                tap_fd: husk_vmm::jail::FIRST_PASSED_FD,
                mac: net.mac.clone(),
                mtu: net.mtu,
            }),
            memory_mib: self.config.memory_mib,
            vcpus: u8::try_from(self.config.vcpus).unwrap_or(u8::MAX),
            cmdline: KERNEL_CMDLINE.into(),
            snapshot: mode.clone(),
        };
        if let Some(binary) = self.virtiofsd.clone() {
            for (i, share) in self.config.shares.clone().iter().enumerate() {
                let socket = self.vm_path(&format!("fs{i}.sock"));
                let staging = self.run_path(&format!("fs{i}.stage"));
                let log = self.run_path(&format!("virtiofsd{i}.log"));
                let fs = Virtiofsd::start(&binary, share, &socket, &staging, &log)?;
                jail::adopt(self.cgroup.as_ref(), fs.child.id());
                self.fs.push(fs);
                doc.fs.push(FsDevice {
                    tag: share.tag.clone(),
                    socket,
                });
            }
        }
        let mut binds = vec![
            JailBind::ro(&self.config.kernel),
            JailBind::ro(&self.config.initramfs),
            JailBind::ro("/dev/kvm"),
        ];
        if let Some(SnapshotMode::Restore { dir }) = &mode {
            binds.push(JailBind::ro(dir));
        }
        for disk in &self.config.disks {
            let (path, read_only) = match disk.is_unplugged() {
                true => (self.unplugged_disk(&disk.serial)?, false),
                false => (disk.path.clone(), disk.read_only),
            };
            binds.push(JailBind {
                path: path.clone(),
                writable: !read_only,
            });
            doc.disks.push(DiskDevice {
                serial: disk.serial.clone(),
                path,
                read_only,
            });
        }
        let doc_path = self.run_path("vmm.json");
        let spawn_err = |source| HypervisorError::Spawn {
            program: HUSK_VMM,
            source,
        };
        let text = serde_json::to_vec(&doc).map_err(|e| spawn_err(std::io::Error::other(e)))?;
        std::fs::write(&doc_path, text).map_err(spawn_err)?;
        binds.push(JailBind::ro(&doc_path));
        let argv = vec![
            jail::arg(&self.vmm)?,
            "--config".into(),
            jail::arg(&doc_path)?,
        ];
        debug!(vmm = %self.vmm.display(), ?mode, "starting the built-in VMM");
        let jail = Jail {
            binds,
            cgroup_procs: crate::cgroup::procs_files(self.cgroup.as_ref()),
            // virtiofsd's sockets, while it builds the VM; its own filter forbids it after.
            allow_connect: true,
            netns: self.plugged_net().map(|n| n.netns.clone()),
            tap: self.plugged_net().map(|n| n.tap.clone()),
            ..Jail::default()
        };
        let log = self.vm_path("vmm.log");
        let run_dir = self.config.run_dir.clone();
        let child = jail::spawn(&self.vmm, HUSK_VMM, jail, argv, &run_dir, &log)?;
        info!(pid = child.id(), "built-in VMM started");
        self.child = Some(child);
        self.log_cap = Some(ConsoleCap::start(&[self.vm_path("vmm.log")], CONSOLE_CAP));
        Ok(())
    }

    /// Stops husk-vmm and virtiofsd (the cgroup stays).
    async fn halt(&mut self) -> Result<(), HypervisorError> {
        helpers::stop_vm(self.child.take(), &mut self.fs).await?;
        self.log_cap = None;
        self.ready = None;
        Ok(())
    }

    /// Restores the VM from the snapshot `dir` and waits until its guest answers on
    /// [`VmConfig::ready_port`].
    async fn restore(&mut self, dir: &Path) -> Result<(), String> {
        let mode = SnapshotMode::Restore {
            dir: dir.to_owned(),
        };
        self.launch(Some(mode)).await.map_err(|e| e.with_causes())?;
        self.ready = Some(snapshot::wait_ready(self, crate::snapshot::RESTORE_TIMEOUT).await?);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Hypervisor for KvmDoor {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        jail::make_vm_dir(&self.config.run_dir)?;
        self.cgroup = jail::host_cgroup(&self.config)?;
        if let Some((store, key, dir)) = snapshot::for_boot(self).await {
            let restored = self.restore(&dir).await;
            if crate::snapshot::settle_restore(&store, &key, restored) {
                return Ok(());
            }
            self.halt().await?;
            let _ = std::fs::remove_file(self.vsock_path());
        }
        self.launch(None).await
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
        let vmm = crate::tail_lines(&self.vm_path("vmm.log"), 3).join(" | ");
        match vmm.is_empty() {
            true => format!("last console lines: {console}"),
            false => format!("last console lines: {console}; husk-vmm: {vmm}"),
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
