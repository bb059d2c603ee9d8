//! OCI bundles for tests: a busybox-static rootfs and `husk spec`'s config.json, edited.

use std::path::Path;

use serde_json::Value;

/// A bundle in a temporary directory.
#[derive(Debug)]
pub struct TestBundle {
    dir: tempfile::TempDir,
}

impl TestBundle {
    /// A busybox rootfs whose process is `args`, config written by `husk spec`.
    pub fn busybox(husk: &super::Husk, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("husk-bundle-")
            .tempdir()
            .expect("bundle dir");
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs dir");
        }
        let busybox = which("busybox");
        std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        let list = std::process::Command::new(&busybox)
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        let status = husk
            .command(&["spec", "--bundle", dir.path().to_str().expect("utf-8")])
            .status()
            .expect("husk spec");
        assert!(status.success(), "husk spec failed");
        let bundle = Self { dir };
        bundle.edit(|c| c["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect());
        bundle
    }

    /// Turns the rootfs into a raw ext4 disk image `rootfs.img` of `mib` MiB (mkfs.ext4 -d)
    /// and points `root.path` at it: the block-device rootfs.
    pub fn into_disk_image(self, mib: u32) -> Self {
        let image = self.dir.path().join("rootfs.img");
        let out = std::process::Command::new(which("mkfs.ext4"))
            .args(["-q", "-F", "-d"])
            .arg(self.dir.path().join("rootfs"))
            .arg(&image)
            .arg(format!("{mib}M"))
            .output()
            .expect("mkfs.ext4");
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(self.dir.path().join("rootfs")).expect("remove rootfs dir");
        self.edit(|c| c["root"]["path"] = "rootfs.img".into());
        self
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Edits config.json.
    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        let path = self.dir.path().join("config.json");
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read config")).expect("json");
        f(&mut config);
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json"))
            .expect("write config");
    }
}

/// `program` in PATH or the sbin directories.
pub fn which(program: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .expect("program on PATH")
}
