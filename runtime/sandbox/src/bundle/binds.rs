//! Bind mounts of host paths: each source, file or directory, becomes a virtio-fs share of its
//! own, `bind0`, `bind1`, ..., holding only that entry under its name (the door stages it), which
//! the agent mounts and binds into the container from `<share>/<name>`: the bind's root in the
//! guest's mountinfo is then the source's name, as under runc. A share whose every bind is
//! read-only is exported read-only by the host. A directory bound with `rbind` and with `bind`
//! makes two shares: one with the mounts below it on the host, one without.

use std::path::{Path, PathBuf};

use husk_hypervisor::{EntryKind, ShareEntry};
use husk_protocol::BindSource;

/// A host file or directory shared for bind mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindShare {
    /// virtio-fs tag.
    pub tag: String,
    /// Host directory (absolute, canonical): the source's directory, or the source itself when
    /// it is `/` (which has no name: the share is then `/`, whole).
    pub dir: PathBuf,
    /// The source in `dir`: only that entry is shared.
    pub entry: Option<ShareEntry>,
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
    /// directory), bound `read_only` or not and, a directory, `recursive` (`rbind`) or not,
    /// adding its share if it is a new one.
    pub fn source(
        &mut self,
        source: &Path,
        read_only: bool,
        recursive: bool,
    ) -> Result<BindSource, String> {
        let (dir, entry) = self.locate(source, recursive)?;
        let found = self
            .shares
            .iter_mut()
            .find(|s| s.dir == dir && s.entry == entry);
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
                    entry: entry.clone(),
                    read_only,
                });
                tag
            }
        };
        let (path, file) = match entry {
            Some(ShareEntry {
                name,
                kind: EntryKind::Dir { .. },
            }) => (Some(name), None),
            Some(ShareEntry {
                name,
                kind: EntryKind::File,
            }) => (None, Some(name)),
            None => (None, None),
        };
        Ok(BindSource { tag, path, file })
    }

    /// The canonical directory of `source` and `source` as an entry of it.
    fn locate(
        &self,
        source: &Path,
        recursive: bool,
    ) -> Result<(PathBuf, Option<ShareEntry>), String> {
        let path = match source.is_absolute() {
            true => source.to_owned(),
            false => self.bundle.join(source),
        };
        let shown = path.display();
        let path = std::fs::canonicalize(&path).map_err(|e| format!("bind source {shown}: {e}"))?;
        let meta = std::fs::metadata(&path).map_err(|e| format!("bind source {shown}: {e}"))?;
        let kind = if meta.is_dir() {
            EntryKind::Dir { recursive }
        } else if meta.is_file() {
            EntryKind::File
        } else {
            return Err(format!(
                "bind source {}: only directories and regular files can be shared into the VM",
                path.display()
            ));
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            // `/`: shared whole.
            return Ok((path, None));
        };
        let name = name
            .to_str()
            .ok_or_else(|| format!("bind source {}: its name is not UTF-8", path.display()))?;
        let entry = ShareEntry {
            name: name.to_owned(),
            kind,
        };
        Ok((parent.to_owned(), Some(entry)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_source_each_source_shared_once_as_an_entry_of_its_directory() {
        let bundle = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(bundle.path()).unwrap();
        std::fs::create_dir(bundle.path().join("data")).unwrap();
        std::fs::write(bundle.path().join("data/f"), "x").unwrap();
        let mut binds = BindShares::new(bundle.path());
        let a = binds.source(Path::new("data"), true, true).unwrap();
        let b = binds
            .source(&bundle.path().join("data/f"), true, false)
            .unwrap();
        let a2 = binds
            .source(Path::new("data/../data"), false, true)
            .unwrap();
        assert_eq!((a.tag.as_str(), a2.tag.as_str()), ("bind0", "bind0"));
        assert_eq!((a.path.as_deref(), a.file.as_deref()), (Some("data"), None));
        assert_eq!(
            (b.tag.as_str(), b.path, b.file.as_deref()),
            ("bind1", None, Some("f"))
        );
        assert_eq!(binds.shares.len(), 2);
        assert_eq!(binds.shares[0].dir, top);
        assert_eq!(binds.shares[1].dir, top.join("data"));
        // One read-write bind makes its share read-write; the file stays read-only.
        assert!(!binds.shares[0].read_only);
        assert!(binds.shares[1].read_only);
        assert!(binds.source(Path::new("missing"), false, false).is_err());
        assert!(binds.source(Path::new("/dev/null"), false, false).is_err());
    }

    #[test]
    fn test_source_bind_and_rbind_of_a_dir_two_shares() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::create_dir(bundle.path().join("data")).unwrap();
        let mut binds = BindShares::new(bundle.path());
        let rbind = binds.source(Path::new("data"), false, true).unwrap();
        let bind = binds.source(Path::new("data"), false, false).unwrap();
        assert_eq!((rbind.tag.as_str(), bind.tag.as_str()), ("bind0", "bind1"));
        let kinds: Vec<_> = binds
            .shares
            .iter()
            .map(|s| s.entry.clone().unwrap().kind)
            .collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Dir { recursive: true },
                EntryKind::Dir { recursive: false }
            ]
        );
    }

    #[test]
    fn test_source_root_shared_whole() {
        let mut binds = BindShares::new(Path::new("/"));
        let s = binds.source(Path::new("/"), true, true).unwrap();
        assert_eq!((s.path, s.file), (None, None));
        assert_eq!(binds.shares[0].dir, Path::new("/"));
        assert_eq!(binds.shares[0].entry, None);
    }

    #[test]
    fn test_source_symlinked_file_shares_its_target() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(bundle.path().join("real"), "x").unwrap();
        std::os::unix::fs::symlink("real", bundle.path().join("link")).unwrap();
        let mut binds = BindShares::new(bundle.path());
        let s = binds.source(Path::new("link"), false, false).unwrap();
        assert_eq!(s.file.as_deref(), Some("real"));
    }
}
