//! The built-in VMM door: the VM is a `husk-vmm` process (runtime/vmm) booting the same kernel
//! and initramfs on KVM, with the vsock device in process and virtio-fs from virtiofsd over
//! vhost-user, exactly as the QEMU door shares the rootfs.

use std::path::PathBuf;

use tokio::process::{Child, Command};
use tracing::{debug, info};

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::helpers::{self, Virtiofsd};
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
    /// Bounds vmm.log while husk-vmm runs (husk-vmm caps the console file itself).
    log_cap: Option<ConsoleCap>,
}

impl KvmDoor {
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
            log_cap: None,
        })
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }
}

#[async_trait::async_trait]
impl Hypervisor for KvmDoor {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("--kernel").arg(&self.config.kernel);
        cmd.arg("--initramfs").arg(&self.config.initramfs);
        cmd.arg("--console").arg(self.console_path());
        cmd.arg("--vsock-uds").arg(self.vsock_path());
        cmd.args([
            "--memory-mib",
            &self.config.memory_mib.to_string(),
            "--vcpus",
            &self.config.vcpus.to_string(),
            "--cmdline",
            KERNEL_CMDLINE,
        ]);
        if let Some(binary) = self.virtiofsd.clone() {
            for (i, share) in self.config.shares.clone().iter().enumerate() {
                let socket = self.run_path(&format!("fs{i}.sock"));
                let log = self.run_path(&format!("virtiofsd{i}.log"));
                self.fs
                    .push(Virtiofsd::start(&binary, share, &socket, &log).await?);
                cmd.arg("--fs")
                    .arg(format!("{}={}", share.tag, socket.display()));
            }
        }
        for disk in &self.config.disks {
            let flag = if disk.read_only {
                "--disk-ro"
            } else {
                "--disk"
            };
            let mut value = std::ffi::OsString::from(format!("{}=", disk.serial));
            value.push(&disk.path);
            cmd.arg(flag).arg(value);
        }
        debug!(vmm = %self.vmm.display(), "starting the built-in VMM");
        let child = helpers::spawn_logged(HUSK_VMM, &mut cmd, &self.run_path("vmm.log"))?;
        info!(pid = child.id(), "built-in VMM started");
        self.child = Some(child);
        self.log_cap = Some(ConsoleCap::start(&[self.run_path("vmm.log")], CONSOLE_CAP));
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
        let vmm = crate::tail_lines(&self.run_path("vmm.log"), 3).join(" | ");
        match vmm.is_empty() {
            true => format!("last console lines: {console}"),
            false => format!("last console lines: {console}; husk-vmm: {vmm}"),
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
        self.log_cap = None;
        Ok(())
    }
}
