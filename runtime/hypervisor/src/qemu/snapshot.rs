//! Where a QEMU VM's boot snapshot comes from: the store, or, for the first VM of its shape,
//! a VM booted for it alone ([`crate::snapshot::maker_config`]) and saved with QEMU's own
//! migration to a file once its guest answers.
//!
//! The saved VM's memory is a file (`memory-backend-file`, and the migration capability
//! `x-ignore-shared` keeps it out of the migration stream), so QEMU saves only the devices'
//! state; the memory is then copied into the snapshot without its all-zero pages. Before it is saved, the serial relay quiesces the guest's channel: no
//! stream is open and no frame is half sent, so a restored guest reads the new relay's hello
//! first ([`husk_protocol::mux`]).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{cmdline, Accel, QemuDoor, SnapshotArgs};
use crate::snapshot::{self, Store, PREPARE_TIMEOUT, SAVE_TIMEOUT};
use crate::{jail, Hypervisor};

/// The snapshot `door`'s VM starts from, with its store and key; `None` boots cold.
pub(super) async fn for_boot(door: &QemuDoor) -> Option<(Store, String, PathBuf)> {
    let name = match door.accel {
        Accel::Kvm => "qemu-kvm",
        Accel::Tcg => "qemu-tcg",
    };
    let cmdline = cmdline::kernel_cmdline(door.accel);
    snapshot::for_boot(&door.config, name, &door.qemu, &cmdline, |store, key| {
        prepare(door, store, key)
    })
    .await
}

/// Oldest QEMU that saves a VM with vhost-user-fs (7.2 marks the device unmigratable).
pub const MIN_QEMU_MAJOR: u32 = 10;

/// The major version `qemu --version` reports.
///
/// # Errors
/// QEMU does not run or says no version.
pub async fn qemu_major(qemu: &Path) -> Result<u32, String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .ok_or_else(|| format!("{} says no version", qemu.display()))
}

/// Boots a VM of `door`'s shape, saves it as `key`'s snapshot and removes what it used.
async fn prepare(door: &QemuDoor, store: Store, key: String) -> Result<PathBuf, String> {
    let major = qemu_major(&door.qemu).await?;
    if major < MIN_QEMU_MAJOR {
        return Err(format!(
            "QEMU {major} cannot save a VM with virtio-fs ({MIN_QEMU_MAJOR} or later can: \
             `make deps` installs it)"
        ));
    }
    let config = snapshot::maker_config(&door.config)?;
    let mut maker = QemuDoor::new(config).map_err(|e| e.with_causes())?;
    maker.accel = door.accel;
    let made = save(&mut maker).await;
    let _ = maker.halt().await;
    let installed = made.and_then(|made| store.install(&key, &made));
    snapshot::remove_maker(&door.config);
    installed
}

/// Boots `maker`'s VM with its memory in the snapshot directory, waits for its guest,
/// quiesces the channel and has QEMU save the devices' state; returns the directory once QEMU
/// is done with it.
async fn save(maker: &mut QemuDoor) -> Result<PathBuf, String> {
    let deadline = Instant::now() + PREPARE_TIMEOUT + SAVE_TIMEOUT;
    jail::make_vm_dir(&maker.config.run_dir).map_err(|e| e.with_causes())?;
    let made = maker.vm_path("snapshot");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&made)
        .map_err(|e| format!("{}: {e}", made.display()))?;
    // Made here, private: QEMU sizes it, and writes the pages the guest touches into it.
    let memory = maker.vm_path("guest-ram");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&memory)
        .map_err(|e| format!("{}: {e}", memory.display()))?;
    let state = file_uri(&made.join(husk_vmm::snapshot::STATE_FILE))?;
    let args = SnapshotArgs::Save {
        memory: memory.clone(),
    };
    let mut qmp = maker
        .launch(Some(args), None, deadline)
        .await
        .map_err(|e| e.with_causes())?
        .ok_or("QEMU has no monitor")?;
    // Closed before the guest is saved: a restored guest has no connection.
    drop(maker.wait_ready(PREPARE_TIMEOUT).await?);
    if let Some(port) = maker.config.save_port {
        // Without it the snapshot only holds more.
        if let Err(reason) = snapshot::ready_to_save(&maker.vsock_path(), port).await {
            tracing::info!(%reason, "saving the guest with its free memory as it is");
        }
    }
    quiesce(&maker.vsock_path()).await?;
    qmp.ignore_shared_memory().await?;
    qmp.execute("stop", json!({})).await?;
    qmp.execute("migrate", json!({ "uri": state })).await?;
    qmp.migration_done().await?;
    maker.halt().await.map_err(|e| e.with_causes())?;
    // Only the pages that are not all zeros (the guest zeroes what it allocates): a VM
    // restored from the snapshot copies, and holds, none of the others.
    let saved = made.join(husk_vmm::snapshot::MEMORY_FILE);
    let copied = husk_vmm::snapshot::copy_memory_file(&memory, &saved);
    let _ = std::fs::remove_file(&memory);
    copied.map_err(|e| format!("saving the guest's memory: {e}"))?;
    Ok(made)
}

/// Asks the serial relay behind `uds` to quiesce the guest's channel, and waits for it.
async fn quiesce(uds: &Path) -> Result<(), String> {
    let ask = async {
        let mut relay = crate::connect_socket_no_follow(uds).await?;
        relay.write_all(b"QUIESCE\n").await?;
        let mut answer = Vec::new();
        relay.take(64).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(SAVE_TIMEOUT, ask).await {
        Ok(Ok(answer)) if answer == b"OK QUIESCED\n" => Ok(()),
        Ok(Ok(_)) => Err("the guest's channel did not quiesce".into()),
        Ok(Err(e)) => Err(format!("quiescing the guest's channel: {e}")),
        Err(_) => Err("the guest's channel did not quiesce in time".into()),
    }
}

/// `path` as QEMU's `file:` migration URI; a `,` (which QEMU would read as an option) is
/// refused.
pub(super) fn file_uri(path: &Path) -> Result<String, String> {
    match path.to_str() {
        Some(p) if !p.contains(',') => Ok(format!("file:{p}")),
        _ => Err(format!(
            "{} cannot be named to QEMU's migration",
            path.display()
        )),
    }
}
