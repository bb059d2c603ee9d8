//! Where a built-in-VMM VM's boot snapshot comes from: the store, or, for the first VM of its
//! shape, a VM booted for it alone and saved once its guest answers
//! ([`crate::snapshot::maker_config`]): husk-vmm saves on SIGUSR1.

use std::path::PathBuf;

use husk_vmm::document::SnapshotMode;

use super::KvmDoor;
use crate::qemu::KERNEL_CMDLINE;
use crate::snapshot::{self, Store, PREPARE_TIMEOUT, SAVE_TIMEOUT};
use crate::{jail, Hypervisor};

/// The snapshot `door`'s VM starts from, with its store and key; `None` boots cold.
pub(super) async fn for_boot(door: &KvmDoor) -> Option<(Store, String, PathBuf)> {
    snapshot::for_boot(
        &door.config,
        "kvm",
        &door.vmm,
        KERNEL_CMDLINE,
        |store, key| prepare(door, store, key),
    )
    .await
}

/// Boots a VM of `door`'s shape, saves it as `key`'s snapshot and removes what it used.
async fn prepare(door: &KvmDoor, store: Store, key: String) -> Result<PathBuf, String> {
    let config = snapshot::maker_config(&door.config)?;
    let mut maker = KvmDoor::new(config).map_err(|e| e.with_causes())?;
    let made = save(&mut maker, &store, &key).await;
    let _ = maker.halt().await;
    snapshot::remove_maker(&door.config);
    made
}

/// Boots `maker`'s VM to be saved, waits for its guest, has husk-vmm save it (SIGUSR1) and
/// installs the snapshot.
async fn save(maker: &mut KvmDoor, store: &Store, key: &str) -> Result<PathBuf, String> {
    jail::make_vm_dir(&maker.config.run_dir).map_err(|e| e.with_causes())?;
    let made = maker.vm_path("snapshot");
    maker
        .launch(Some(SnapshotMode::Save { dir: made.clone() }))
        .await
        .map_err(|e| e.with_causes())?;
    // Closed before the guest is saved: a restored guest has no connection.
    drop(wait_ready(maker, PREPARE_TIMEOUT).await?);
    // To the jail's launcher, which relays it to husk-vmm (its pid namespace's init).
    let pid = maker
        .launcher_pid()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or("the VMM has no pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|e| format!("asking the VMM to save: {e}"))?;
    let child = maker.child.as_mut().ok_or("the VMM is gone")?;
    let status = match tokio::time::timeout(SAVE_TIMEOUT, child.wait()).await {
        Ok(status) => status.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("not saved within {} s", SAVE_TIMEOUT.as_secs())),
    };
    maker.child = None;
    if !status.success() {
        return Err(format!(
            "the VMM saving it ended with {status}; {}",
            maker.diagnostics()
        ));
    }
    store.install(key, &made)
}

/// Waits until the guest of `door`'s running VM answers on [`crate::VmConfig::ready_port`];
/// returns the connection it accepted.
pub(super) async fn wait_ready(
    door: &mut KvmDoor,
    timeout: std::time::Duration,
) -> Result<tokio::net::UnixStream, String> {
    let (uds, port) = (door.vsock_path(), door.config.ready_port);
    let ready = snapshot::wait_ready(door.child.as_mut(), &uds, port, timeout).await;
    ready.map_err(|reason| format!("{reason}; {}", door.diagnostics()))
}
