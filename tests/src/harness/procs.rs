//! Host processes and mounts as /proc shows them: finding a containerd shim and what it
//! spawned (the container's processes under runc; the VMM and virtiofsd under husk), killing
//! them, and checking that nothing of a container is left.

use std::path::Path;

/// Process names (argv[0]'s file name) of a husk VMM.
pub const VMM_NAMES: [&str; 2] = ["qemu-system-x86_64", "husk-vmm"];
/// Process names of the helpers a husk VMM needs besides itself.
pub const HELPER_NAMES: [&str; 1] = ["virtiofsd"];

/// One process, read from `/proc/<pid>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// argv[0]'s file name (`comm`, which the kernel cuts at 15 bytes, when argv is empty).
    pub name: String,
    /// The command line.
    pub argv: Vec<String>,
    /// Start time in clock ticks since boot (`stat` field 22): tells a reused pid apart.
    pub start: u64,
}

impl Proc {
    /// The process `pid`, if it exists (zombies included).
    pub fn read(pid: u32) -> Option<Self> {
        let dir = Path::new("/proc").join(pid.to_string());
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split at
        // the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let start = fields.get(19)?.parse().ok()?;
        let argv: Vec<String> = std::fs::read(dir.join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let name = argv
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map_or(comm, |n| n.to_string_lossy().into_owned());
        Some(Self {
            pid,
            ppid,
            name,
            argv,
            start,
        })
    }

    /// Whether this very process (same pid, same start time) still exists.
    pub fn alive(&self) -> bool {
        Self::read(self.pid).is_some_and(|p| p.start == self.start)
    }

    /// Whether a command-line argument contains `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        self.argv.iter().any(|a| a.contains(needle))
    }

    /// Whether it is a husk VMM (QEMU or husk-vmm running a VM; not husk-vmm as a jail's
    /// launcher or as QEMU's serial relay).
    pub fn is_vmm(&self) -> bool {
        let role = self.argv.get(1).map(String::as_str);
        VMM_NAMES.contains(&self.name.as_str()) && !matches!(role, Some("jail" | "serial-relay"))
    }

    /// Whether it is a VMM or one of its helpers (virtiofsd, a jail's launcher, the serial
    /// relay).
    pub fn is_vmm_or_helper(&self) -> bool {
        VMM_NAMES.contains(&self.name.as_str()) || HELPER_NAMES.contains(&self.name.as_str())
    }

    /// Sends SIGKILL (an error when it is gone already is ignored).
    pub fn kill(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }

    /// Proportional set size in KiB (`smaps_rollup`), or the resident set size (`status`)
    /// where the kernel has no rollup; 0 for a process that is gone.
    pub fn pss_kib(&self) -> u64 {
        let dir = Path::new("/proc").join(self.pid.to_string());
        let field = |file: &str, key: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        field("smaps_rollup", "Pss:")
            .or_else(|| field("status", "VmRSS:"))
            .unwrap_or(0)
    }

    /// KiB of guest memory held in the VM memory files this process maps (memfds; a restored
    /// VM's holds its copy of its snapshot's memory) beyond the pages it maps: pages of the
    /// file that no process's PSS counts. Count it for the VMM only (virtiofsd maps the same
    /// file).
    pub fn unmapped_guest_memory_kib(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = Path::new("/proc").join(self.pid.to_string());
        let Ok(smaps) = std::fs::read_to_string(dir.join("smaps")) else {
            return 0;
        };
        let mut total = 0;
        // The address range of the guest memory mapping whose fields come next.
        let mut guest: Option<&str> = None;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            if !first.ends_with(':') {
                let path = line.split_whitespace().nth(5).unwrap_or_default();
                guest = path.starts_with("/memfd:").then_some(first);
            } else if let (Some(range), "Rss:") = (guest, first) {
                let mapped: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let held = std::fs::metadata(dir.join("map_files").join(range))
                    .map_or(0, |m| m.blocks() / 2);
                total += held.saturating_sub(mapped);
                guest = None;
            }
        }
        total
    }
}

/// Every process on the host.
pub fn all() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(Proc::read)
        .collect()
}

/// Every descendant of `root` (children, their children, ...), `root` excluded.
pub fn descendants(root: u32) -> Vec<Proc> {
    let procs = all();
    let mut found: Vec<Proc> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if !found.iter().any(|f| f.pid == p.pid) {
                frontier.push(p.pid);
                found.push(p.clone());
            }
        }
    }
    found
}

/// Mount points (from /proc/self/mountinfo) whose line mentions `needle`.
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}
