//! Bind mounts of host paths: each source directory (a file's parent directory, for a
//! file) becomes a virtio-fs share of its own, `bind0`, `bind1`, ..., which the agent mounts
//! and binds into the container.

use std::path::{Path, PathBuf};

use husk_protocol::BindSource;

/// A host directory shared for bind mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindShare {
    /// virtio-fs tag.
    pub tag: String,
    /// Host directory (absolute).
    pub dir: PathBuf,
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
    /// directory), adding its share if it is a new one.
    pub fn source(&mut self, source: &Path) -> Result<BindSource, String> {
        let path = match source.is_absolute() {
            true => source.to_owned(),
            false => self.bundle.join(source),
        };
        let meta =
            std::fs::metadata(&path).map_err(|e| format!("bind source {}: {e}", path.display()))?;
        let (dir, file) = if meta.is_dir() {
            (path.clone(), None)
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
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| format!("bind source {}: {e}", dir.display()))?;
        let tag = match self.shares.iter().find(|s| s.dir == dir) {
            Some(share) => share.tag.clone(),
            None => {
                let tag = format!("bind{}", self.shares.len());
                self.shares.push(BindShare {
                    tag: tag.clone(),
                    dir,
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
    fn test_source_dirs_shared_once_and_files_by_parent() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::create_dir(bundle.path().join("data")).unwrap();
        std::fs::write(bundle.path().join("data/f"), "x").unwrap();
        let mut binds = BindShares::new(bundle.path());
        let a = binds.source(Path::new("data")).unwrap();
        let b = binds.source(&bundle.path().join("data/f")).unwrap();
        assert_eq!(a.tag, "bind0");
        assert_eq!((b.tag.as_str(), b.file.as_deref()), ("bind0", Some("f")));
        assert_eq!(binds.shares.len(), 1);
        assert!(binds.source(Path::new("missing")).is_err());
        assert!(binds.source(Path::new("/dev/null")).is_err());
    }
}
