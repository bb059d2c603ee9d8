//! The built-in VMM's configuration as one typed document: the door writes it (JSON) and
//! `husk-vmm --config FILE` reads it, so both sides share one definition instead of a
//! command line kept in step by hand.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::VmmError;

/// One Linux guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmDocument {
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initramfs: PathBuf,
    /// File the serial console is written to (capped).
    pub console: PathBuf,
    /// Host side of the hybrid vsock.
    pub vsock_uds: PathBuf,
    /// virtio-fs devices, each served by a virtiofsd.
    pub fs: Vec<FsDevice>,
    /// virtio-blk disks on raw images.
    pub disks: Vec<DiskDevice>,
    /// A virtio-net device on a tap the jail opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetDevice>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel command line (the VMM appends its virtio-mmio devices).
    pub cmdline: String,
    /// Save the booted VM, or restore a saved one instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotMode>,
}

/// What `husk-vmm` does with a snapshot ([`crate::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SnapshotMode {
    /// Boot the guest; on `SIGUSR1` pause it, save it into the new directory `dir` and exit
    /// with status 0.
    Save {
        /// Where the snapshot goes (made by husk-vmm, so it must not exist).
        dir: PathBuf,
    },
    /// Rebuild the VM saved in `dir` (with this document's devices, which must be the saved
    /// VM's) instead of booting.
    Restore {
        /// The snapshot.
        dir: PathBuf,
    },
}

/// A virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsDevice {
    /// Mount tag.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDevice {
    /// Serial (at most 20 bytes), by which the guest finds it.
    pub serial: String,
    /// Raw image.
    pub path: PathBuf,
    /// The guest cannot write it.
    pub read_only: bool,
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDevice {
    /// The tap's descriptor in husk-vmm (passed by the jail, [`crate::jail::FIRST_PASSED_FD`]
    /// onwards).
    pub tap_fd: i32,
    /// The guest's hardware address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The network's MTU, offered to the driver, where known.
    pub mtu: Option<u16>,
}

impl VmmDocument {
    /// Reads a document written by the door.
    ///
    /// # Errors
    /// An unreadable or malformed file, named.
    pub fn read(path: &Path) -> Result<Self, VmmError> {
        let bad = |e: &dyn std::fmt::Display| {
            VmmError::Config(format!("VMM document {}: {e}", path.display()))
        };
        let text = std::fs::read(path).map_err(|e| bad(&e))?;
        serde_json::from_slice(&text).map_err(|e| bad(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_document_round_trips_rejects_unknown_fields() {
        let doc = VmmDocument {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            console: "/r/console.log".into(),
            vsock_uds: "/r/vsock.sock".into(),
            fs: vec![FsDevice {
                tag: "rootfs".into(),
                socket: "/r/fs0.sock".into(),
            }],
            disks: vec![DiskDevice {
                serial: "d".into(),
                path: "/d.img".into(),
                read_only: true,
            }],
            net: Some(NetDevice {
                tap_fd: 3,
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1500),
            }),
            memory_mib: 256,
            vcpus: 2,
            cmdline: "console=ttyS0".into(),
            snapshot: Some(SnapshotMode::Restore { dir: "/s".into() }),
        };
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<VmmDocument>(&text).unwrap(), doc);
        let bad = text.replacen('{', "{\"vcpu\":1,", 1);
        assert!(serde_json::from_str::<VmmDocument>(&bad).is_err());
    }
}
