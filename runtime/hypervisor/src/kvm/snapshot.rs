//! Where a built-in-VMM VM's boot snapshot comes from: the store, or, for the first VM of its
//! shape, a VM booted for it alone and saved once its guest answers.
//!
//! The VM that is saved is not the container's: it boots with the same devices, its shares
//! served from an empty read-only directory (a guest mounts nothing before its first
//! container), runs nothing but the agent, and ends when saved. Then the container's VM is
//! restored from the new snapshot like any later one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_vmm::document::SnapshotMode;
use tracing::{debug, warn};

use super::KvmDoor;
use crate::qemu::KERNEL_CMDLINE;
use crate::snapshot::{snapshot_key, Store};
use crate::{jail, Export, FsShare, Hypervisor, VmConfig};

/// How long a restored guest may take to answer (milliseconds on KVM; seconds when the host is
/// itself emulated).
pub(super) const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VM being saved may take to boot to its agent.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long husk-vmm may take to write a snapshot once asked.
const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The snapshot `door`'s VM starts from, with its store and key; `None` boots cold (a line
/// says why: debug when snapshots do not apply, a warning when making one failed).
pub(super) async fn for_boot(door: &KvmDoor) -> Option<(Store, String, PathBuf)> {
    let store = Store::open()
        .inspect_err(|reason| warn!(%reason, "no snapshot store: booting cold"))
        .ok()?;
    let key = snapshot_key(&store, &door.config, "kvm", &door.vmm, KERNEL_CMDLINE)
        .inspect_err(|reason| debug!(%reason, "no boot snapshot: booting cold"))
        .ok()?;
    if let Some(dir) = store.lookup(&key) {
        return Some((store, key, dir));
    }
    match prepare(door, &store, &key).await {
        Ok(dir) => {
            tracing::info!(snapshot = %key, "boot snapshot made");
            Some((store, key, dir))
        }
        Err(reason) => {
            warn!(snapshot = %key, %reason, "making the boot snapshot failed: booting cold");
            None
        }
    }
}

/// Boots a VM of `door`'s shape, saves it as `key`'s snapshot and removes what it used.
async fn prepare(door: &KvmDoor, store: &Store, key: &str) -> Result<PathBuf, String> {
    let _lock = store
        .try_lock(key)
        .ok_or("another VM is making it (this one boots cold)")?;
    if let Some(dir) = store.lookup(key) {
        return Ok(dir);
    }
    let run_dir = door.config.run_dir.join("snapshot-boot");
    let empty = run_dir.join("empty");
    std::fs::create_dir_all(&empty).map_err(|e| format!("{}: {e}", empty.display()))?;
    let config = VmConfig {
        shares: door
            .config
            .shares
            .iter()
            .map(|share| FsShare {
                tag: share.tag.clone(),
                export: Export::Dir {
                    path: empty.clone(),
                    read_only: true,
                },
                keep_cache: false,
            })
            .collect(),
        run_dir: run_dir.clone(),
        cgroup: None,
        snapshot: false,
        ..door.config.clone()
    };
    let mut maker = KvmDoor::new(config).map_err(|e| e.to_string())?;
    let made = save(&mut maker, store, key).await;
    let _ = maker.halt().await;
    crate::remove_vm_dir(&run_dir);
    let _ = std::fs::remove_dir_all(&run_dir);
    made
}

/// Boots `maker`'s VM to be saved, waits for its guest, has husk-vmm save it (SIGUSR1) and
/// installs the snapshot.
async fn save(maker: &mut KvmDoor, store: &Store, key: &str) -> Result<PathBuf, String> {
    jail::make_vm_dir(&maker.config.run_dir).map_err(|e| e.to_string())?;
    let made = maker.vm_path("snapshot");
    maker
        .launch(Some(SnapshotMode::Save { dir: made.clone() }))
        .await
        .map_err(|e| e.to_string())?;
    wait_ready(maker, PREPARE_TIMEOUT).await?;
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

/// Waits until the guest of `door`'s running VM accepts a connection on
/// [`VmConfig::ready_port`], or its VMM ends, or `timeout` passes.
pub(super) async fn wait_ready(door: &mut KvmDoor, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let (uds, port) = (door.vsock_path(), door.config.ready_port);
    loop {
        if let Some(Ok(Some(status))) = door.child.as_mut().map(|c| c.try_wait()) {
            return Err(format!(
                "the VMM ended with {status}; {}",
                door.diagnostics()
            ));
        }
        let attempt = crate::connect_vsock(&uds, port);
        if let Ok(Ok(_answered)) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the guest did not answer on vsock port {port} within {} s; {}",
                timeout.as_secs(),
                door.diagnostics()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
