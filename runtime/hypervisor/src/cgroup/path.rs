//! `linux.cgroupsPath` -> the cgroup's directory below each hierarchy's root, as components.
//!
//! Three forms (OCI runtime spec 1.2, config-linux.md, "Cgroups path"; runc's conventions):
//! - `/a/b`: below each hierarchy's root.
//! - `a/b`: also below each hierarchy's root. runc resolves it below its own cgroup; husk does
//!   not, because the runtime's processes would then sit in an inner cgroup, which cgroup v2
//!   forbids for a cgroup with controllers enabled for its children.
//! - `slice:prefix:name` (containerd's and Docker's systemd driver; any path that does not
//!   start with `/` and has exactly two `:`): the scope `prefix-name.scope` (`name.scope`
//!   without a prefix, `name` itself when it is a slice) in the expanded slice, as systemd
//!   lays units out: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, `-.slice` is the root,
//!   an empty slice is `system.slice`. The directories are made directly, without systemd.
//!
//! Refused: an empty path or the root itself, `.` and `..` components, NUL and other control
//! characters, a component longer than [`NAME_MAX`] bytes, a path longer than [`PATH_MAX`];
//! in the systemd form, a character systemd refuses in a unit name, or an invalid slice name.

/// Longest name of one cgroup directory (the kernel's `NAME_MAX`).
pub(super) const NAME_MAX: usize = 255;
/// Longest cgroup path accepted (room for the mount point within the kernel's 4096).
pub(super) const PATH_MAX: usize = 2048;
/// The slice of a systemd-style path that names none (runc's default).
const DEFAULT_SLICE: &str = "system.slice";

/// The components of `path` below a hierarchy's root.
///
/// # Errors
/// Why `path` is refused (see the module's documentation).
pub(super) fn components(path: &str) -> Result<Vec<String>, String> {
    if path.len() > PATH_MAX {
        return Err(format!("longer than {PATH_MAX} bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err("holds a control character".into());
    }
    let parts: Vec<&str> = path.split(':').collect();
    let components = match parts.as_slice() {
        [slice, prefix, name] if !path.starts_with('/') => systemd(slice, prefix, name)?,
        _ => path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    if components.is_empty() {
        return Err("names the root cgroup, which no container owns".into());
    }
    for c in &components {
        if c == "." || c == ".." {
            return Err(format!("has a {c:?} component"));
        }
        if c.len() > NAME_MAX {
            return Err(format!("has a component longer than {NAME_MAX} bytes"));
        }
    }
    Ok(components)
}

/// `slice:prefix:name` -> the expanded slice, then the unit.
fn systemd(slice: &str, prefix: &str, name: &str) -> Result<Vec<String>, String> {
    if name.is_empty() {
        return Err("has an empty name in its slice:prefix:name form".into());
    }
    if ![slice, prefix, name]
        .iter()
        .all(|p| p.chars().all(unit_char))
    {
        return Err(
            "has a character systemd refuses in a unit name in its slice:prefix:name form".into(),
        );
    }
    let slice = match slice {
        "" => DEFAULT_SLICE,
        s => s,
    };
    let mut components = expand_slice(slice)?;
    components.push(match (prefix, name) {
        (_, name) if name.ends_with(".slice") => name.to_owned(),
        ("", name) => format!("{name}.scope"),
        (prefix, name) => format!("{prefix}-{name}.scope"),
    });
    Ok(components)
}

/// A character systemd allows in a unit name (`unit-name.c`, `VALID_CHARS`).
fn unit_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '\\')
}

/// A slice unit's directories, as systemd nests them: each `-` opens a child slice.
fn expand_slice(slice: &str) -> Result<Vec<String>, String> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(format!("slice {slice:?} does not end with .slice"));
    };
    if stem == "-" {
        return Ok(Vec::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(format!("slice {slice:?} is not a valid systemd slice name"));
    }
    let mut prefix = String::new();
    Ok(stem
        .split('-')
        .map(|part| {
            if !prefix.is_empty() {
                prefix.push('-');
            }
            prefix.push_str(part);
            format!("{prefix}.slice")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> Vec<String> {
        components(path).unwrap()
    }

    #[test]
    fn test_components_absolute_and_relative_below_root() {
        assert_eq!(ok("/a/b"), ["a", "b"]);
        assert_eq!(ok("a/b"), ["a", "b"]);
        assert_eq!(ok("//a//b/"), ["a", "b"]);
    }

    #[test]
    fn test_components_systemd_docker_scope() {
        assert_eq!(
            ok("system.slice:docker:abc"),
            ["system.slice", "docker-abc.scope"]
        );
    }

    #[test]
    fn test_components_systemd_kubepods_slice_expanded() {
        assert_eq!(
            ok("kubepods-besteffort-pod123.slice:cri-containerd:abc"),
            [
                "kubepods.slice",
                "kubepods-besteffort.slice",
                "kubepods-besteffort-pod123.slice",
                "cri-containerd-abc.scope"
            ]
        );
    }

    #[test]
    fn test_components_systemd_defaults_root_slice_and_slice_unit() {
        assert_eq!(ok(":docker:abc"), ["system.slice", "docker-abc.scope"]);
        assert_eq!(ok("-.slice:p:n"), ["p-n.scope"]);
        assert_eq!(ok("user.slice::n"), ["user.slice", "n.scope"]);
        assert_eq!(
            ok("a.slice:p:a-b.slice"),
            ["a.slice", "a-b.slice"].map(str::to_owned)
        );
    }

    #[test]
    fn test_components_bad_paths_refused() {
        let long = format!("/{}", "x".repeat(NAME_MAX + 1));
        let too_long = "/a".repeat(PATH_MAX);
        for bad in [
            "",
            "/",
            "//",
            "/a/../b",
            "..",
            "/a/./b",
            "/a\0b",
            "/a\nb",
            long.as_str(),
            too_long.as_str(),
            "system:docker:abc",
            "a--b.slice:p:n",
            "-a.slice:p:n",
            "a.slice:p/q:n",
            "a.slice:p:",
            "a.slice:p:n m",
            "a/b.slice:p:n",
        ] {
            assert!(components(bad).is_err(), "{bad:?} accepted");
        }
    }
}
