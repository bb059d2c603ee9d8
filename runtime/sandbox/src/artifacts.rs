//! Where the guest kernel and initramfs are: a flag or env var, else `share/husk/` beside the
//! binary (`make` output and `make install` layout), else the system share directories.

use std::path::{Path, PathBuf};

/// Resolves `explicit` or the first existing `<dir>/<name>` of the search list. When none
/// exists, the first candidate is returned so the error names where it was expected.
pub fn locate(explicit: Option<&Path>, name: &str) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    let candidates = search_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.is_file())
        .or(candidates.first())
        .cloned()
        .unwrap_or_else(|| PathBuf::from(name))
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        dirs.push(bin_dir.join("../share/husk"));
    }
    dirs.push("/usr/local/share/husk".into());
    dirs.push("/usr/share/husk".into());
    dirs
}
