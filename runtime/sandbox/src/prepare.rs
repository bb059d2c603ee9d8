//! `husk snapshot prepare`: the boot snapshots of the usual VM shapes, made before a container
//! needs one, so that no container's VM boots a kernel to make its shape's snapshot.

use std::path::Path;

use husk_hypervisor::{new_door, Disk, Export, FsShare, NetDevice, VmConfig};
use tracing::info;

use crate::bundle::{BINDS_TAG, ROOTFS_SERIAL, ROOTFS_TAG};
use crate::pod::POD_TAG;
use crate::{SandboxError, VmOptions};

/// The shapes prepared (with `opts`' memory and vCPUs), as virtio-fs tags, whether the VM
/// has a network device and whether its rootfs is a disk: `husk run` of a bundle's rootfs
/// directory, the same with bind mounts (what Docker and Podman pass) without and with a
/// network (theirs by default), `husk run` of a disk image rootfs, and a pod of the shim
/// without and with a network (a CRI pod's). (The built-in VMM saves no network device yet:
/// there, those shapes boot without one and are not saved.)
const SHAPES: [(&[&str], bool, bool); 6] = [
    (&[ROOTFS_TAG], false, false),
    (&[ROOTFS_TAG, BINDS_TAG], false, false),
    (&[ROOTFS_TAG, BINDS_TAG], true, false),
    (&[], false, true),
    (&[POD_TAG], false, false),
    (&[POD_TAG], true, false),
];

/// Makes the snapshot of each shape that has none yet: starts a VM of the shape from its
/// snapshot (the door makes the snapshot first when it is missing) and stops it. Works in a
/// directory of `root` that is removed after.
///
/// # Errors
/// A door that cannot start a VM here.
pub async fn prepare_snapshots(opts: &VmOptions, root: &Path) -> Result<(), SandboxError> {
    let dir = root.join(format!("snapshot-prepare-{}", std::process::id()));
    let result = prepare_in(opts, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn prepare_in(opts: &VmOptions, dir: &Path) -> Result<(), SandboxError> {
    for (i, (tags, net, disk)) in SHAPES.iter().enumerate() {
        let run_dir = dir.join(i.to_string());
        let empty = run_dir.join("empty");
        std::fs::create_dir_all(&empty).map_err(|source| SandboxError::StateDir {
            path: empty.clone(),
            source,
        })?;
        let config = VmConfig {
            kernel: opts.kernel.clone(),
            initramfs: opts.initramfs.clone(),
            memory_mib: opts.memory_mib,
            vcpus: opts.vcpus,
            shares: tags
                .iter()
                .map(|tag| FsShare {
                    tag: (*tag).to_owned(),
                    export: Export::Dir {
                        path: empty.clone(),
                        read_only: true,
                    },
                    keep_cache: true,
                })
                .collect(),
            // Unplugged: the key is that of a VM with the disk or network device, no file,
            // namespace or tap is needed.
            disks: disk
                .then(|| Disk::unplugged(ROOTFS_SERIAL))
                .into_iter()
                .collect(),
            net: net.then(NetDevice::unplugged),
            run_dir,
            cgroup: None,
            snapshot: true,
            ready_port: husk_protocol::AGENT_PORT,
            save_port: Some(husk_protocol::SAVE_PORT),
        };
        let mut vm = new_door(opts.hypervisor, config)?;
        let started = vm.start().await;
        let _ = vm.stop().await;
        started?;
        info!(shares = ?tags, net, disk, "snapshot shape prepared");
    }
    Ok(())
}
