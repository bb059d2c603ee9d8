//! The QEMU door: `qemu-system-x86_64 -M microvm,acpi=off` with direct kernel boot.
//!
//! Guest memory is a shared memfd so that device backends in other threads or processes can
//! map it: our own vsock device (served from this process over vhost-user, see
//! `husk_devices::vsock`) and one virtiofsd per share. QEMU appends the virtio-mmio devices to
//! the kernel command line itself when ACPI is off. All helpers die with the thread that
//! spawned them (PR_SET_PDEATHSIG), so a killed husk leaves no VM behind.

mod cmdline;

use std::path::PathBuf;

use husk_devices::{spawn_vhost_user_vsock, VsockConfig, VsockDaemon};
use tokio::process::{Child, Command};
use tracing::{debug, info};

pub use cmdline::{Accel, KERNEL_CMDLINE};

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::helpers::{self, Virtiofsd};
use crate::{find_program, Hypervisor, HypervisorError, VmConfig, VmExit};

/// QEMU binary the door runs.
const QEMU: &str = "qemu-system-x86_64";
/// util-linux's nsenter: QEMU starts in a pod's network namespace through it (it execs QEMU,
/// same process).
const NSENTER: &str = "nsenter";
/// Context id of every guest (each VM has its own vsock device, so they never clash).
const GUEST_CID: u64 = 3;

/// A VM run by QEMU.
#[derive(Debug)]
pub struct QemuDoor {
    config: VmConfig,
    qemu: PathBuf,
    virtiofsd: Option<PathBuf>,
    accel: Accel,
    vsock: Option<VsockDaemon>,
    fs: Vec<Virtiofsd>,
    child: Option<Child>,
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
        let virtiofsd = helpers::require_inputs(&config)?;
        Ok(Self {
            config,
            qemu,
            virtiofsd,
            accel: choose_accel(),
            vsock: None,
            fs: Vec::new(),
            child: None,
            console_cap: None,
        })
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    async fn start_virtiofsd(&mut self) -> Result<Vec<PathBuf>, HypervisorError> {
        let Some(binary) = self.virtiofsd.clone() else {
            return Ok(Vec::new());
        };
        let mut sockets = Vec::new();
        for (i, share) in self.config.shares.clone().iter().enumerate() {
            let socket = self.run_path(&format!("fs{i}.sock"));
            let log = self.run_path(&format!("virtiofsd{i}.log"));
            self.fs
                .push(Virtiofsd::start(&binary, share, &socket, &log).await?);
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
        let vsock_socket = self.run_path("vhost-vsock.sock");
        let vsock_config = VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: self.vsock_path(),
        };
        self.vsock = Some(spawn_vhost_user_vsock(vsock_config, &vsock_socket)?);
        let fs = self.start_virtiofsd().await?;
        let sockets = cmdline::Sockets {
            vsock: vsock_socket,
            fs,
        };
        let args = cmdline::args(&self.config, self.accel, &sockets, &self.console_path());
        debug!(qemu = %self.qemu.display(), ?args, "starting QEMU");
        let mut cmd = match &self.config.net {
            // Started in the pod's network namespace, where it opens the pod's tap.
            Some(net) => {
                let mut netns = std::ffi::OsString::from("--net=");
                netns.push(&net.netns);
                let mut cmd = Command::new(NSENTER);
                cmd.arg(netns).arg("--").arg(&self.qemu);
                cmd
            }
            None => Command::new(&self.qemu),
        };
        cmd.args(&args);
        let child = helpers::spawn_logged(QEMU, &mut cmd, &self.run_path("qemu.log"))?;
        info!(pid = child.id(), accel = ?self.accel, "QEMU started");
        self.child = Some(child);
        let capped = [self.console_path(), self.run_path("qemu.log")];
        self.console_cap = Some(ConsoleCap::start(&capped, CONSOLE_CAP));
        Ok(())
    }

    fn vsock_path(&self) -> PathBuf {
        self.run_path("vsock.sock")
    }

    fn console_path(&self) -> PathBuf {
        self.run_path("console.log")
    }

    fn diagnostics(&self) -> String {
        let console = crate::tail_lines(&self.console_path(), 8).join(" | ");
        let qemu = crate::tail_lines(&self.run_path("qemu.log"), 3).join(" | ");
        match qemu.is_empty() {
            true => format!("last console lines: {console}"),
            false => format!("last console lines: {console}; qemu: {qemu}"),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn wait(&mut self) -> Result<VmExit, HypervisorError> {
        helpers::wait_vm(self.child.as_mut(), &mut self.fs).await
    }

    async fn stop(&mut self) -> Result<(), HypervisorError> {
        if let Some(mut child) = self.child.take() {
            if child
                .try_wait()
                .map_err(HypervisorError::Process)?
                .is_none()
            {
                child.start_kill().map_err(HypervisorError::Process)?;
            }
            child.wait().await.map_err(HypervisorError::Process)?;
        }
        for mut fs in self.fs.drain(..) {
            fs.stop().await;
        }
        if let Some(vsock) = self.vsock.take() {
            vsock.shutdown()?;
        }
        self.console_cap = None;
        Ok(())
    }
}
