//! Bind mounts of host paths: each source, file or directory, is an entry of the one `binds`
//! virtio-fs share, alone in a slot of its own (`<slot>/<name>`, the door stages it), which the
//! agent binds into the container: the bind's root in the guest's mountinfo is then the
//! source's name, as under runc. An entry whose every bind is read-only is exported read-only
//! by the host. A directory bound with `rbind` and with `bind` makes two entries: one with the
//! mounts below it on the host, one without. One share for all: a VM has few device slots.

use std::path::{Path, PathBuf};

use husk_hypervisor::{EntryKind, ShareEntry};
use husk_protocol::BindSource;

/// The virtio-fs tag of the share holding every bind source.
pub const BINDS_TAG: &str = "binds";

/// The entries the bind mounts of one bundle need.
#[derive(Debug)]
pub(super) struct BindShares {
    bundle: PathBuf,
    pub entries: Vec<ShareEntry>,
}

impl BindShares {
    pub fn new(bundle: &Path) -> Self {
        Self {
            bundle: bundle.to_owned(),
            entries: Vec::new(),
        }
    }

    /// The agent's source for host path `source` (absolute, or relative to the bundle
    /// directory), bound `read_only` or not and, a directory, `recursive` (`rbind`) or not,
    /// adding its entry if it is a new one.
    pub fn source(
        &mut self,
        source: &Path,
        read_only: bool,
        recursive: bool,
    ) -> Result<BindSource, String> {
        let (path, name, kind) = self.locate(source, recursive)?;
        let index = match self
            .entries
            .iter()
            .position(|e| e.source == path && e.kind == kind)
        {
            Some(index) => {
                self.entries[index].read_only &= read_only;
                index
            }
            None => {
                self.entries.push(ShareEntry {
                    slot: self.entries.len().to_string(),
                    source: path,
                    name,
                    kind,
                    read_only,
                });
                self.entries.len() - 1
            }
        };
        let entry = &self.entries[index];
        let (path, file) = match (&entry.name, entry.kind) {
            (Some(name), EntryKind::File) => (entry.slot.clone(), Some(name.clone())),
            _ => (entry.path_in_share().to_string_lossy().into_owned(), None),
        };
        Ok(BindSource {
            tag: BINDS_TAG.to_owned(),
            path: Some(path),
            file,
        })
    }

    /// The canonical path of `source`, its name (none for `/`) and kind.
    fn locate(
        &self,
        source: &Path,
        recursive: bool,
    ) -> Result<(PathBuf, Option<String>, EntryKind), String> {
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
        let name = match path.file_name() {
            Some(name) => Some(
                name.to_str()
                    .ok_or_else(|| {
                        format!("bind source {}: its name is not UTF-8", path.display())
                    })?
                    .to_owned(),
            ),
            // `/`: its slot is the directory itself.
            None => None,
        };
        Ok((path, name, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, file) of a source.
    fn at(s: &BindSource) -> (Option<&str>, Option<&str>) {
        (s.path.as_deref(), s.file.as_deref())
    }

    #[test]
    fn test_source_each_source_one_entry_in_a_slot_of_its_own() {
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
        assert_eq!((a.tag.as_str(), b.tag.as_str()), (BINDS_TAG, BINDS_TAG));
        assert_eq!(
            (at(&a), at(&a2)),
            ((Some("0/data"), None), (Some("0/data"), None))
        );
        assert_eq!(at(&b), (Some("1"), Some("f")));
        assert_eq!(binds.entries.len(), 2);
        assert_eq!(binds.entries[0].source, top.join("data"));
        assert_eq!(binds.entries[1].source, top.join("data/f"));
        // One read-write bind makes its entry read-write; the file stays read-only.
        assert!(!binds.entries[0].read_only);
        assert!(binds.entries[1].read_only);
        assert!(binds.source(Path::new("missing"), false, false).is_err());
        assert!(binds.source(Path::new("/dev/null"), false, false).is_err());
    }

    #[test]
    fn test_source_bind_and_rbind_of_a_dir_two_entries() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::create_dir(bundle.path().join("data")).unwrap();
        let mut binds = BindShares::new(bundle.path());
        let rbind = binds.source(Path::new("data"), false, true).unwrap();
        let bind = binds.source(Path::new("data"), false, false).unwrap();
        assert_eq!(
            (at(&rbind), at(&bind)),
            ((Some("0/data"), None), (Some("1/data"), None))
        );
        let kinds: Vec<_> = binds.entries.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Dir { recursive: true },
                EntryKind::Dir { recursive: false }
            ]
        );
    }

    #[test]
    fn test_source_root_is_its_slot() {
        let mut binds = BindShares::new(Path::new("/"));
        let s = binds.source(Path::new("/"), true, true).unwrap();
        assert_eq!(at(&s), (Some("0"), None));
        assert_eq!(binds.entries[0].source, Path::new("/"));
        assert_eq!(binds.entries[0].name, None);
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
