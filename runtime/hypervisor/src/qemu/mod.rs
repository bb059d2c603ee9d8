//! The QEMU door: `qemu-system-x86_64 -M microvm,acpi=off` with direct kernel boot.
//!
//! Guest memory is a shared memfd so that device backends in other processes can map it: our
//! own vsock device (`husk-vmm vhost-vsock`, see `husk_devices::vsock`) and one virtiofsd per
//! share. QEMU appends the virtio-mmio devices to the kernel command line itself when ACPI is
//! off. QEMU and the vsock backend run jailed ([`crate::jail`]), QEMU under its own
//! `-sandbox` too. All helpers die with the thread that spawned them (PR_SET_PDEATHSIG), so a
//! killed husk leaves no VM behind.

mod cmdline;

use std::path::PathBuf;

use husk_vmm::jail::JailBind;
use tokio::process::Child;
use tracing::{debug, info};

pub use cmdline::{Accel, KERNEL_CMDLINE};

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::helpers::{self, Virtiofsd};
use crate::jail::{self, Jail};
use crate::{find_program, Hypervisor, HypervisorError, VmConfig, VmExit};

/// QEMU binary the door runs.
const QEMU: &str = "qemu-system-x86_64";
/// husk's VMM binary: the jail launcher and the vsock backend.
const HUSK_VMM: &str = "husk-vmm";

/// A VM run by QEMU.
#[derive(Debug)]
pub struct QemuDoor {
    config: VmConfig,
    qemu: PathBuf,
    vmm: PathBuf,
    virtiofsd: Option<PathBuf>,
    accel: Accel,
    vsock: Option<Child>,
    fs: Vec<Virtiofsd>,
    child: Option<Child>,
    cgroup: Option<crate::cgroup::HostCgroup>,
    /// Bounds the console and qemu.log while QEMU runs (the guest writes both).
    console_cap: Option<ConsoleCap>,
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
            vsock: None,
            fs: Vec::new(),
            child: None,
            cgroup: None,
            console_cap: None,
        })
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// A file in the directory the VM's jailed processes may write ([`crate::vm_dir`]).
    fn vm_path(&self, name: &str) -> PathBuf {
        crate::vm_dir(&self.config.run_dir).join(name)
    }

    async fn start_virtiofsd(&mut self) -> Result<Vec<PathBuf>, HypervisorError> {
        let Some(binary) = self.virtiofsd.clone() else {
            return Ok(Vec::new());
        };
        let mut sockets = Vec::new();
        for (i, share) in self.config.shares.clone().iter().enumerate() {
            let socket = self.vm_path(&format!("fs{i}.sock"));
            let staging = self.run_path(&format!("fs{i}.stage"));
            let log = self.run_path(&format!("virtiofsd{i}.log"));
            self.fs
                .push(Virtiofsd::start(&binary, share, &socket, &staging, &log).await?);
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

#[async_trait::async_trait]
impl Hypervisor for QemuDoor {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        jail::make_vm_dir(&self.config.run_dir)?;
        self.cgroup = jail::host_cgroup(&self.config)?;
        let run_dir = self.config.run_dir.clone();
        let vhost_vsock = self.vm_path("vhost-vsock.sock");
        let argv = vec![
            jail::arg(&self.vmm)?,
            "vhost-vsock".into(),
            "--socket".into(),
            jail::arg(&vhost_vsock)?,
            "--uds".into(),
            jail::arg(&self.vsock_path())?,
        ];
        let log = self.vm_path("vsock.log");
        let jail = Jail {
            cgroup_procs: crate::cgroup::procs_files(self.cgroup.as_ref()),
            ..Jail::default()
        };
        let mut vsock = jail::spawn(&self.vmm, "vsock", jail, argv, &run_dir, &log)?;
        let timeout = std::time::Duration::from_secs(10);
        for socket in [&vhost_vsock, &self.vsock_path()] {
            helpers::wait_for_socket("vsock", &mut vsock, socket, &log, timeout).await?;
        }
        self.vsock = Some(vsock);
        let fs = self.start_virtiofsd().await?;
        let mut argv = vec![jail::arg(&self.qemu)?];
        for a in cmdline::args(&self.config, self.accel, &self.console_path()) {
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
        binds.extend(self.config.disks.iter().map(|d| JailBind {
            path: d.path.clone(),
            writable: !d.read_only,
        }));
        if self.accel == Accel::Kvm {
            binds.push(JailBind::ro("/dev/kvm"));
        }
        let mut connect = vec![vhost_vsock];
        connect.extend(fs);
        let jail = Jail {
            binds,
            cgroup_procs: crate::cgroup::procs_files(self.cgroup.as_ref()),
            netns: self.config.net.as_ref().map(|n| n.netns.clone()),
            connect,
            tap: self.config.net.as_ref().map(|n| n.tap.clone()),
            allow_connect: false,
        };
        let log = self.vm_path("qemu.log");
        let child = jail::spawn(&self.vmm, QEMU, jail, argv, &run_dir, &log)?;
        info!(pid = child.id(), accel = ?self.accel, "QEMU started");
        self.child = Some(child);
        let capped = [
            self.console_path(),
            self.vm_path("qemu.log"),
            self.vm_path("vsock.log"),
        ];
        self.console_cap = Some(ConsoleCap::start(&capped, CONSOLE_CAP));
        Ok(())
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
        helpers::stop_vm(self.child.take(), &mut self.fs).await?;
        if let Some(mut vsock) = self.vsock.take() {
            let _ = vsock.start_kill();
            let _ = vsock.wait().await;
            for socket in ["vhost-vsock.sock", "vsock.sock"] {
                let _ = std::fs::remove_file(self.vm_path(socket));
            }
        }
        self.console_cap = None;
        jail::remove_cgroup(self.cgroup.take()).await;
        Ok(())
    }
}
