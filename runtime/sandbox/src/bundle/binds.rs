//! Bind mounts of host paths: each source directory, and each source file, becomes a
//! virtio-fs share of its own, `bind0`, `bind1`, ..., which the agent mounts and binds into the
//! container. A file's share holds that file only (the door stages it), and a share whose
//! every bind is read-only is exported read-only by the host.

use std::path::{Path, PathBuf};

use husk_protocol::BindSource;

/// A host directory, or one file of it, shared for bind mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindShare {
    /// virtio-fs tag.
    pub tag: String,
    /// Host directory (absolute, canonical): the source, or a file source's directory.
    pub dir: PathBuf,
    /// A file source's name in `dir`: only that file is shared.
    pub file: Option<String>,
    /// Every bind of the share is read-only.
    pub read_only: bool,
}

/// The shares the bind mounts of one bundle need.
#[derive(Debug)]
pub(super) struct BindShares {
    bundle: PathBuf,
    pub shares: Vec<BindShare>,
}

impl BindShares {
    pub fn new(bundle: &Path) -> Self {
        Self {
            bundle: bundle.to_owned(),
            shares: Vec::new(),
        }
    }

    /// The agent's source for host path `source` (absolute, or relative to the bundle
    /// directory), bound `read_only` or not, adding its share if it is a new one.
    pub fn source(&mut self, source: &Path, read_only: bool) -> Result<BindSource, String> {
        let path = match source.is_absolute() {
            true => source.to_owned(),
            false => self.bundle.join(source),
        };
        let path = std::fs::canonicalize(&path)
            .map_err(|e| format!("bind source {}: {e}", path.display()))?;
        let meta =
            std::fs::metadata(&path).map_err(|e| format!("bind source {}: {e}", path.display()))?;
        let (dir, file) = if meta.is_dir() {
            (path, None)
        } else if meta.is_file() {
            let parent = path.parent().map(Path::to_owned).unwrap_or_default();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (parent, name)
        } else {
            return Err(format!(
                "bind source {}: only directories and regular files can be shared into the VM",
                path.display()
            ));
        };
        let found = self
            .shares
            .iter_mut()
            .find(|s| s.dir == dir && s.file == file);
        let tag = match found {
            Some(share) => {
                share.read_only &= read_only;
                share.tag.clone()
            }
            None => {
                let tag = format!("bind{}", self.shares.len());
                self.shares.push(BindShare {
                    tag: tag.clone(),
                    dir,
                    file: file.clone(),
                    read_only,
                });
                tag
            }
        };
        Ok(BindSource {
            tag,
            path: None,
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_source_dirs_shared_once_and_each_file_alone() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::create_dir(bundle.path().join("data")).unwrap();
        std::fs::write(bundle.path().join("data/f"), "x").unwrap();
        let mut binds = BindShares::new(bundle.path());
        let a = binds.source(Path::new("data"), true).unwrap();
        let b = binds.source(&bundle.path().join("data/f"), true).unwrap();
        let a2 = binds.source(Path::new("data/../data"), false).unwrap();
        assert_eq!((a.tag.as_str(), a2.tag.as_str()), ("bind0", "bind0"));
        assert_eq!((b.tag.as_str(), b.file.as_deref()), ("bind1", Some("f")));
        assert_eq!(binds.shares.len(), 2);
        // One read-write bind makes its share read-write; the file stays read-only.
        assert!(!binds.shares[0].read_only);
        assert!(binds.shares[1].read_only);
        assert_eq!(binds.shares[1].file.as_deref(), Some("f"));
        assert!(binds.source(Path::new("missing"), false).is_err());
        assert!(binds.source(Path::new("/dev/null"), false).is_err());
    }

    #[test]
    fn test_source_symlinked_file_shares_its_target() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(bundle.path().join("real"), "x").unwrap();
        std::os::unix::fs::symlink("real", bundle.path().join("link")).unwrap();
        let mut binds = BindShares::new(bundle.path());
        let s = binds.source(Path::new("link"), false).unwrap();
        assert_eq!(s.file.as_deref(), Some("real"));
    }
}
