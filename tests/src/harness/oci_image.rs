//! A busybox OCI image, built here without a registry or a network: one uncompressed layer
//! (busybox-static and a symlink per applet, the usual top-level directories, a passwd and a
//! group file), its config, a manifest and an `index.json` naming it [`IMAGE`] (and, with
//! `sleep` as its command, [`PAUSE_IMAGE`]), in an OCI
//! image layout (image-spec v1.0 `image-layout.md`) packed as one tar for `ctr images import`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::which;

/// The name `ctr images import` gives the image (the index's `org.opencontainers.image.ref.name`).
pub const IMAGE: &str = "docker.io/library/husk-busybox:test";
/// The same layer with `sleep` as its command: the CRI tests' sandbox ("pause") image.
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:test";

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The image as an OCI-layout tar, built once per test process.
///
/// It lives in `$TMPDIR/husk-oci-image-<pid>`: a `static` is never dropped, so each process
/// removes the directories of processes that are gone instead.
///
/// # Panics
/// When busybox or GNU tar are missing or fail.
pub fn busybox_image_tar() -> &'static Path {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    IMAGE_TAR.get_or_init(|| {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("image dir");
        build(&dir)
    })
}

/// The image's one layer, a plain tar of its root filesystem (for `podman import`, `docker
/// import`), built with [`busybox_image_tar`].
pub fn busybox_rootfs_tar() -> PathBuf {
    busybox_image_tar().with_file_name("layer.tar")
}

const DIR_PREFIX: &str = "husk-oci-image-";

/// Removes `husk-oci-image-<pid>` directories whose process no longer exists.
fn remove_stale_dirs() {
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn build(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    make_rootfs(&rootfs);
    let layout = dir.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("blobs dir");
    let layer_tar = dir.join("layer.tar");
    tar(&rootfs, &layer_tar);
    let layer = add_blob(
        &layout,
        &std::fs::read(&layer_tar).expect("layer"),
        LAYER_MEDIA_TYPE,
    );
    std::fs::remove_dir_all(&rootfs).expect("remove rootfs");
    let manifests: Vec<Value> = [
        (IMAGE, json!(["sh"])),
        (PAUSE_IMAGE, json!(["sleep", "2147483647"])),
    ]
    .into_iter()
    .map(|(name, cmd)| manifest(&layout, &layer, name, cmd))
    .collect();
    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    std::fs::write(layout.join("index.json"), to_vec(&index)).expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let image = dir.join("husk-busybox.tar");
    tar(&layout, &image);
    std::fs::remove_dir_all(&layout).expect("remove layout");
    image
}

/// The config and manifest of an image `name` of `layer` running `cmd`, added to `layout`;
/// the manifest's descriptor, named.
fn manifest(layout: &Path, layer: &Value, name: &str, cmd: Value) -> Value {
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        // An uncompressed layer's diff_id is its own digest.
        "rootfs": { "type": "layers", "diff_ids": [layer["digest"]] },
    });
    let config = add_blob(layout, &to_vec(&config), CONFIG_MEDIA_TYPE);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config,
        "layers": [layer],
    });
    let mut manifest = add_blob(layout, &to_vec(&manifest), MANIFEST_MEDIA_TYPE);
    manifest["annotations"] = json!({ "org.opencontainers.image.ref.name": name });
    manifest
}

/// busybox plus a symlink per applet (`busybox --list`), as `TestBundle::busybox` does.
fn make_rootfs(rootfs: &Path) {
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs dir");
    }
    let busybox = which("busybox");
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // The list names busybox itself: linking it would replace the binary.
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet symlink");
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
}

/// `dir`'s contents as an uncompressed tar at `out`, owned by root, with fixed times.
fn tar(dir: &Path, out: &Path) {
    let result = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .args(["--mtime=@0", "-cf"])
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .output()
        .expect("GNU tar");
    assert!(
        result.status.success(),
        "tar of {}: {}",
        dir.display(),
        String::from_utf8_lossy(&result.stderr)
    );
}

/// Stores `data` under `blobs/sha256/<hex>` and returns its descriptor.
fn add_blob(layout: &Path, data: &[u8], media_type: &str) -> Value {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(layout.join("blobs/sha256").join(&hex), data).expect("blob");
    json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len() })
}

fn to_vec(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("json")
}
