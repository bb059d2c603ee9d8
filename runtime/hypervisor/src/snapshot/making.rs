//! What both doors do around a snapshot: find or make the snapshot a VM starts from, the
//! configuration of the VM that is saved, and the wait for a guest's agent.
//!
//! The VM that is saved is not the container's: it boots with the same devices, its shares
//! served from an empty read-only directory (a guest mounts nothing before its first
//! container), runs nothing but the agent, and ends when saved. Then the container's VM is
//! restored from the new snapshot like any later one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Child;
use tracing::{debug, info, warn};

use super::{snapshot_key, Store};
use crate::{Export, FsShare, VmConfig};

/// How long a restored guest may take to answer (milliseconds on KVM; seconds when the host is
/// itself emulated or the guest runs under TCG).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VM being saved may take to boot to its agent.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a VMM may take to write a snapshot once asked.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The snapshot a VM of `config` on `door` (run by `program`, booting with `cmdline`) starts
/// from, with its store and key: the stored one, or one `make` makes now (under the key's
/// lock; it gets the store and the key). `None` boots cold; a line says why (debug when
/// snapshots do not apply, info when making one failed: the cold boot that follows reports
/// its own failure, if the guest cannot boot at all).
pub async fn for_boot<F, Fut>(
    config: &VmConfig,
    door: &str,
    program: &Path,
    cmdline: &str,
    make: F,
) -> Option<(Store, String, PathBuf)>
where
    F: FnOnce(Store, String) -> Fut,
    Fut: Future<Output = Result<PathBuf, String>>,
{
    let store = Store::open()
        .inspect_err(|reason| warn!(%reason, "no snapshot store: booting cold"))
        .ok()?;
    let key = snapshot_key(&store, config, door, program, cmdline)
        .inspect_err(|reason| debug!(%reason, "no boot snapshot: booting cold"))
        .ok()?;
    if let Some(dir) = store.lookup(&key) {
        return Some((store, key, dir));
    }
    let made = {
        let Some(_lock) = store.try_lock(&key) else {
            debug!(snapshot = %key, "another VM is making the boot snapshot: booting cold");
            return None;
        };
        match store.lookup(&key) {
            Some(dir) => Ok(dir),
            None => make(store.clone(), key.clone()).await,
        }
    };
    match made {
        Ok(dir) => {
            info!(snapshot = %key, "boot snapshot made");
            Some((store, key, dir))
        }
        Err(reason) => {
            info!(snapshot = %key, %reason, "making the boot snapshot failed: booting cold");
            None
        }
    }
}

/// Logs how the restore of `key`'s snapshot went and says whether the VM runs; a failed
/// restore removes the snapshot, and the door then stops what it started and boots cold.
pub fn settle_restore(store: &Store, key: &str, restored: Result<(), String>) -> bool {
    match restored {
        Ok(()) => {
            info!(snapshot = %key, "VM restored from its boot snapshot");
            true
        }
        Err(reason) => {
            warn!(snapshot = %key, %reason, "restoring the boot snapshot failed: booting cold (the snapshot is removed)");
            store.remove(key);
            false
        }
    }
}

/// The VM that is saved for `config`'s snapshot: in `config`'s run directory's
/// `snapshot-boot`, every share served from an empty read-only directory, its disks and
/// network device (if any) unplugged ([`crate::Disk::unplugged`],
/// [`crate::NetDevice::unplugged`]), no cgroup.
///
/// # Errors
/// The empty directory cannot be made.
pub fn maker_config(config: &VmConfig) -> Result<VmConfig, String> {
    let run_dir = config.run_dir.join("snapshot-boot");
    let empty = run_dir.join("empty");
    std::fs::create_dir_all(&empty).map_err(|e| format!("{}: {e}", empty.display()))?;
    Ok(VmConfig {
        shares: config
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
        disks: config
            .disks
            .iter()
            .map(|d| crate::Disk::unplugged(&d.serial))
            .collect(),
        net: config.net.as_ref().map(|_| crate::NetDevice::unplugged()),
        run_dir,
        cgroup: None,
        snapshot: false,
        ..config.clone()
    })
}

/// Removes what the VM of [`maker_config`] left in `config`'s run directory.
pub fn remove_maker(config: &VmConfig) {
    let run_dir = config.run_dir.join("snapshot-boot");
    crate::remove_vm_dir(&run_dir);
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// Waits until the guest behind the vsock socket `uds` accepts a connection on `port`, or
/// `vmm` ends, or `timeout` passes; returns the accepted connection.
///
/// # Errors
/// One line: the VMM ended, or the guest did not answer in time (the caller adds what the VM
/// showed).
pub async fn wait_ready(
    mut vmm: Option<&mut Child>,
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<tokio::net::UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(Ok(Some(status))) = vmm.as_mut().map(|c| c.try_wait()) {
            return Err(format!("the VMM ended with {status}"));
        }
        let attempt = crate::connect_vsock(uds, port);
        if let Ok(Ok(answered)) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
            return Ok(answered);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the guest did not answer on port {port} within {} s",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asks the guest behind `uds` on `port` ([`crate::VmConfig::save_port`]) to ready itself to be
/// saved and waits until it closes the connection, within [`SAVE_TIMEOUT`].
///
/// # Errors
/// One line: the guest did not take the connection or did not close it in time.
pub async fn ready_to_save(uds: &Path, port: u32) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let ask = async {
        let mut guest = crate::connect_vsock(uds, port).await?;
        // Nothing is sent back: only the end counts, and no more than a little is read.
        let mut sink = Vec::new();
        (&mut guest).take(64).read_to_end(&mut sink).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(SAVE_TIMEOUT, ask).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("readying the guest to be saved (port {port}): {e}")),
        Err(_) => Err(format!(
            "the guest was not ready to be saved within {} s",
            SAVE_TIMEOUT.as_secs()
        )),
    }
}
