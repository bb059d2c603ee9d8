//! Which cgroup hierarchies this host mounts, from `/proc/self/mountinfo` (proc(5)).
//!
//! - cgroup v1 (any `cgroup` mount with a controller or a `name=`): one leaf in every v1
//!   hierarchy (memory, cpu, cpuacct, cpuset, pids, devices, blkio, freezer, name=systemd, ...,
//!   as runc joins them all), plus one in a cgroup2 mount beside them (the hybrid layout's
//!   `/sys/fs/cgroup/unified`): systemd tracks processes there; it holds no controller, so
//!   husk writes no limit to it.
//! - cgroup v2 only: the one `cgroup2` mount (`/sys/fs/cgroup` when several are).
//!
//! A mount point is each hierarchy's root as this process sees it (in a cgroup namespace, the
//! namespace's root). A hierarchy mounted twice is used once, at its first mount point.

use std::path::{Path, PathBuf};

/// Where the cgroup v2 hierarchy is mounted on current distributions.
const V2_MOUNT_POINT: &str = "/sys/fs/cgroup";
/// cgroup v1 controllers as they appear in mount options.
const V1_CONTROLLERS: &[&str] = &[
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One cgroup mount of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CgroupMount {
    /// The file system's device (`major:minor`): one per hierarchy.
    dev: String,
    mount_point: PathBuf,
    /// `cgroup` or `cgroup2`.
    fstype: String,
    /// Super-block options: a v1 hierarchy's controllers.
    super_options: String,
}

/// What a hierarchy is to the cgroup husk makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Role {
    /// A cgroup v1 hierarchy with these controllers (and `name=...`).
    V1(Vec<String>),
    /// The cgroup v2 hierarchy of a v2-only host: every limit goes here.
    V2,
    /// The cgroup v2 hierarchy beside v1 ones: membership only.
    Hybrid,
}

/// A hierarchy the cgroup is made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchy {
    /// Its root.
    pub mount_point: PathBuf,
    /// What it holds.
    pub role: Role,
}

impl Hierarchy {
    /// A v1 hierarchy with `controller`.
    pub fn is_v1_with(&self, controller: &str) -> bool {
        matches!(&self.role, Role::V1(c) if c.iter().any(|c| c == controller))
    }
}

/// The cgroup mounts listed in `mountinfo`'s text.
pub(super) fn parse(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo.lines().filter_map(parse_line).collect()
}

/// `36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory`
fn parse_line(line: &str) -> Option<CgroupMount> {
    let (before, after) = line.split_once(" - ")?;
    let mut before = before.split(' ');
    let dev = before.nth(2)?;
    let mount_point = before.nth(1)?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let super_options = after.nth(1).unwrap_or_default();
    matches!(fstype, "cgroup" | "cgroup2").then(|| CgroupMount {
        dev: dev.to_owned(),
        mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
        fstype: fstype.to_owned(),
        super_options: super_options.to_owned(),
    })
}

/// mountinfo's octal escapes (`\040` for a space) undone; a malformed one (fewer than three
/// octal digits, a sign) is kept as is. Fuzzed through `husk_sandbox::fuzzing`.
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The hierarchies to make a cgroup in; empty when no cgroup file system is mounted.
pub(super) fn hierarchies(mounts: &[CgroupMount]) -> Vec<Hierarchy> {
    let mut seen: Vec<&str> = Vec::new();
    let mut unique = mounts.iter().filter(|m| {
        let new = !seen.contains(&m.dev.as_str());
        seen.push(&m.dev);
        new
    });
    let v1: Vec<Hierarchy> = unique
        .by_ref()
        .filter_map(|m| {
            let controllers = v1_controllers(m)?;
            Some(Hierarchy {
                mount_point: m.mount_point.clone(),
                role: Role::V1(controllers),
            })
        })
        .collect();
    let v2: Vec<&CgroupMount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    if !v1.is_empty() {
        let hybrid = v2.first().map(|m| Hierarchy {
            mount_point: m.mount_point.clone(),
            role: Role::Hybrid,
        });
        return v1.into_iter().chain(hybrid).collect();
    }
    let main = v2
        .iter()
        .find(|m| m.mount_point == Path::new(V2_MOUNT_POINT))
        .or(v2.first());
    main.map(|m| Hierarchy {
        mount_point: m.mount_point.clone(),
        role: Role::V2,
    })
    .into_iter()
    .collect()
}

/// A v1 mount's controllers (and `name=`), `None` for anything else.
fn v1_controllers(m: &CgroupMount) -> Option<Vec<String>> {
    if m.fstype != "cgroup" {
        return None;
    }
    let controllers: Vec<String> = m
        .super_options
        .split(',')
        .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
        .map(str::to_owned)
        .collect();
    (!controllers.is_empty()).then_some(controllers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's test machines: v1 hierarchies and an empty cgroup2 (hybrid).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
99 31 0:32 / /mnt/memory\\040again rw,relatime - cgroup cgroup rw,memory
";

    /// A current distribution: cgroup v2 only.
    const V2: &str = "\
25 1 0:23 / /sys rw - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn v1(mount_point: &str, controllers: &[&str]) -> Hierarchy {
        Hierarchy {
            mount_point: mount_point.into(),
            role: Role::V1(controllers.iter().map(|c| (*c).to_owned()).collect()),
        }
    }

    #[test]
    fn test_hierarchies_hybrid_every_v1_and_unified_once() {
        let found = hierarchies(&parse(HYBRID));
        assert_eq!(
            found,
            [
                v1("/sys/fs/cgroup/cpu,cpuacct", &["cpu", "cpuacct"]),
                v1("/sys/fs/cgroup/memory", &["memory"]),
                v1("/sys/fs/cgroup/systemd", &["name=systemd"]),
                Hierarchy {
                    mount_point: "/sys/fs/cgroup/unified".into(),
                    role: Role::Hybrid
                },
            ]
        );
        assert!(found[0].is_v1_with("cpu") && !found[0].is_v1_with("memory"));
    }

    #[test]
    fn test_hierarchies_v2_only_one() {
        assert_eq!(
            hierarchies(&parse(V2)),
            [Hierarchy {
                mount_point: "/sys/fs/cgroup".into(),
                role: Role::V2
            }]
        );
    }

    #[test]
    fn test_hierarchies_none_mounted_empty() {
        assert!(hierarchies(&parse("25 1 0:23 / /sys rw - sysfs sysfs rw\n")).is_empty());
        assert!(hierarchies(&parse("garbage\n\n - \n")).is_empty());
    }

    #[test]
    fn test_parse_escaped_mount_point_unescaped() {
        let mounts = parse(HYBRID);
        assert_eq!(
            mounts.last().map(|m| m.mount_point.clone()),
            Some(PathBuf::from("/mnt/memory again"))
        );
        assert_eq!(unescape_mountinfo("a\\04"), "a\\04");
    }
}
