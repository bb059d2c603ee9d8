//! One cgroup v2 group per container under the guest's hierarchy (`/sys/fs/cgroup`, mounted
//! by [`crate::init`]): `containers/<id>` (`containers/.spare` for a container with a cgroup
//! namespace that takes the spare container-init, [`Cgroup::spare`]), with every controller
//! of the guest kernel enabled on the way (memory, cpu, pids and cpuset:
//! kernel-config/fragments/cgroups.config), as runc does. The agent creates it, writes the
//! limits and moves container-init into it before sending the spec, so that everything the
//! container runs is limited and a cgroup namespace made afterwards is rooted there. After
//! the exit, `memory.events` tells whether the OOM killer struck.
//!
//! Limits that only tune what the guest may lack are skipped, with one console line, where
//! their file does not exist: `io.weight` (no io controller: the guest kernel has no block
//! cgroup) and `unified` files of the io, hugetlb and rdma controllers or of swap
//! (`memory.swap.*`), which the host ignores in their structured form for the same reasons.
//! Any other missing `unified` file fails the container, naming the key.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use husk_protocol::{Resources, Stats};
use nix::unistd::Pid;

const ROOT: &str = "/sys/fs/cgroup";
const CONTAINERS: &str = "containers";
/// `unified` key prefixes whose file may be absent in the guest: a tuning the guest cannot
/// honour (no io controller, no huge pages, no RDMA, no swap), skipped as the host skips it.
const UNIFIED_OPTIONAL: [&str; 4] = ["io.", "hugetlb.", "rdma.", "memory.swap."];
/// How long removal waits for the kernel to let go of the container's last processes.
const REMOVE_TRIES: u32 = 50;
const REMOVE_PAUSE: Duration = Duration::from_millis(10);
/// Polls of `cgroup.events` while freezing or thawing (1 s).
const FREEZE_TRIES: u32 = 100;

/// A container's cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `containers/<id>` with `resources` written into it.
    pub fn create(id: &str, resources: &Resources) -> io::Result<Self> {
        let parent = Path::new(ROOT).join(CONTAINERS);
        Self::prepare_parent()?;
        let cgroup = Self {
            path: parent.join(id),
        };
        std::fs::create_dir(&cgroup.path).map_err(|e| annotate(e, &cgroup.path, "mkdir"))?;
        if let Err(e) = cgroup.set(resources) {
            let _ = std::fs::remove_dir(&cgroup.path);
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Creates `containers/.spare` (no container id starts with a dot), the group of a spare
    /// container-init, which a container that takes the spare with a cgroup namespace keeps
    /// (it sees the group as `/`): cgroup v2 cannot rename a group, and moving a process costs
    /// about as much as the clone the spare saves.
    pub fn spare() -> io::Result<Self> {
        Self::create(".spare", &Resources::default())
    }

    /// Makes `containers` with every controller enabled on the way, once (first for the spare,
    /// before the agent's first request, so that a boot snapshot has it; again by the next
    /// [`Cgroup::create`] if that failed).
    fn prepare_parent() -> io::Result<()> {
        static PREPARED: AtomicBool = AtomicBool::new(false);
        if PREPARED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let parent = Path::new(ROOT).join(CONTAINERS);
        enable_controllers(Path::new(ROOT))?;
        mkdir(&parent)?;
        enable_controllers(&parent)?;
        PREPARED.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the limits `r` sets; the others stay as they are. `unified` comes last, so that
    /// it overrides a structured limit naming the same file (as runc).
    pub fn set(&self, r: &Resources) -> io::Result<()> {
        let files = [
            ("memory.max", r.memory_max.map(|v| v.to_string())),
            ("memory.low", r.memory_low.map(|v| v.to_string())),
            ("pids.max", r.pids_max.map(|v| v.to_string())),
            ("cpuset.cpus", r.cpuset_cpus.clone()),
            ("cpuset.mems", r.cpuset_mems.clone()),
        ];
        for (file, value) in files {
            if let Some(value) = value {
                self.write(file, &value)?;
            }
        }
        self.set_cpu(r)?;
        if let Some(weight) = r.io_weight {
            self.write_optional("io.weight", &weight.to_string())?;
        }
        for (file, value) in &r.unified {
            self.write_unified(file, value)?;
        }
        Ok(())
    }

    /// One `unified` file: skipped where the guest lacks what it tunes
    /// ([`UNIFIED_OPTIONAL`]), else it must exist.
    fn write_unified(&self, file: &str, value: &str) -> io::Result<()> {
        if UNIFIED_OPTIONAL.iter().any(|p| file.starts_with(p)) {
            return self.write_optional(file, value);
        }
        self.write(file, value).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                e.kind(),
                format!("unified {file:?}: no such file in the container's cgroup (the guest kernel lacks its controller)"),
            ),
            _ => e,
        })
    }

    /// The cpu controller's files: `cpu.idle` first (the kernel refuses `cpu.weight` for an
    /// idle group, so the weight is then left alone), and `cpu.max.burst`, which must never
    /// exceed the quota: written before `cpu.max` when it fits the current quota, else after.
    fn set_cpu(&self, r: &Resources) -> io::Result<()> {
        if let Some(idle) = r.cpu_idle {
            self.write("cpu.idle", if idle { "1" } else { "0" })?;
        }
        if let (Some(weight), false) = (r.cpu_weight, r.cpu_idle == Some(true)) {
            self.write("cpu.weight", &weight.to_string())?;
        }
        let cpu_max = r.cpu_max();
        let mut burst_after = None;
        if let Some(burst) = r.cpu_burst_us.map(|b| b.to_string()) {
            match self.write("cpu.max.burst", &burst) {
                Err(e) if e.kind() == io::ErrorKind::InvalidInput && cpu_max.is_some() => {
                    burst_after = Some(burst);
                }
                other => other?,
            }
        }
        if let Some(cpu_max) = cpu_max {
            self.write("cpu.max", &cpu_max)?;
        }
        match burst_after {
            Some(burst) => self.write("cpu.max.burst", &burst),
            None => Ok(()),
        }
    }

    /// Freezes (`true`) or thaws the cgroup's processes and waits until the kernel says so.
    pub async fn freeze(&self, frozen: bool) -> io::Result<()> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..FREEZE_TRIES {
            let events = std::fs::read_to_string(self.path.join("cgroup.events"))?;
            if events.lines().any(|l| l == want) {
                return Ok(());
            }
            tokio::time::sleep(REMOVE_PAUSE).await;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("cgroup {} did not become {want}", self.path.display()),
        ))
    }

    /// The cgroup's counters.
    pub fn stats(&self) -> Stats {
        let read = |file: &str| std::fs::read_to_string(self.path.join(file)).unwrap_or_default();
        let keyed = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let number = |file: &str| read(file).trim().parse::<u64>().ok();
        let cpu = read("cpu.stat");
        Stats {
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            memory_current: number("memory.current").unwrap_or(0),
            memory_max: number("memory.max"),
            oom_kills: keyed(&read("memory.events"), "oom_kill"),
            pids_current: number("pids.current").unwrap_or(0),
            pids_max: number("pids.max"),
        }
    }

    /// Moves process `pid` (and the threads of its process) into this cgroup.
    pub fn add(&self, pid: Pid) -> io::Result<()> {
        self.write("cgroup.procs", &pid.as_raw().to_string())
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill`; best effort).
    pub fn kill_all(&self) {
        let _ = self.write("cgroup.kill", "1");
    }

    /// The calling process's own cgroup directory (its `0::` line of `/proc/self/cgroup`).
    pub fn of_self() -> io::Result<PathBuf> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("/proc/self/cgroup has no cgroup v2 line"))?;
        Ok(Path::new(ROOT).join(path.trim_start_matches('/')))
    }

    /// The processes in the cgroup (`cgroup.procs`); none when it cannot be read.
    pub fn pids(&self) -> Vec<Pid> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .map(Pid::from_raw)
            .collect()
    }

    /// Whether the OOM killer killed a process of this cgroup (`memory.events` `oom_kill`).
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events")).is_ok_and(|events| {
            events.lines().any(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
        })
    }

    /// Removes the cgroup once its processes are gone (best effort: a leftover empty group
    /// only costs a directory in a VM that ends with the container); says whether it is gone.
    pub async fn remove(&self) -> bool {
        self.kill_all();
        for _ in 0..REMOVE_TRIES {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
                // The reaper (same thread) still has zombies of the container to collect.
                Err(_) => tokio::time::sleep(REMOVE_PAUSE).await,
            }
        }
        eprintln!("husk-agent: cgroup {} still busy", self.path.display());
        false
    }

    /// Writes `value` to the existing interface file `file` (never creating one: a file the
    /// kernel does not have is `NotFound`). Truncating is what a shell's `>` does; cgroupfs
    /// accepts it.
    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        let path = self.path.join(file);
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| annotate(e, &path, &format!("write {value:?} to")))
    }

    /// As [`Self::write`], but a file the guest kernel does not have is skipped with one
    /// console line: the limit only tunes something the guest cannot honour.
    fn write_optional(&self, file: &str, value: &str) -> io::Result<()> {
        match self.write(file, value) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!(
                    "husk-agent: cgroup: no {file} in the guest kernel: {file}={value} ignored"
                );
                Ok(())
            }
            other => other,
        }
    }
}

/// Enables, for the groups below `dir`, every controller `dir` has (`cgroup.controllers`).
fn enable_controllers(dir: &Path) -> io::Result<()> {
    let available = dir.join("cgroup.controllers");
    let available =
        std::fs::read_to_string(&available).map_err(|e| annotate(e, &available, "read"))?;
    let wanted = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if wanted.is_empty() {
        return Ok(());
    }
    let path = dir.join("cgroup.subtree_control");
    std::fs::write(&path, &wanted).map_err(|e| annotate(e, &path, &format!("write {wanted:?} to")))
}

fn mkdir(path: &Path) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(annotate(e, path, "mkdir")),
        _ => Ok(()),
    }
}

fn annotate(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("cgroup: {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup directory of regular files standing for the interface files it was given,
    /// removed when dropped.
    struct Fake(Cgroup);

    impl std::ops::Deref for Fake {
        type Target = Cgroup;
        fn deref(&self) -> &Cgroup {
            &self.0
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0.path);
        }
    }

    fn fake(name: &str, files: &[&str]) -> Fake {
        let path = std::env::temp_dir().join(format!("husk-cgroup-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        for file in files {
            std::fs::write(path.join(file), "").unwrap();
        }
        Fake(Cgroup { path })
    }

    fn read(cgroup: &Cgroup, file: &str) -> String {
        std::fs::read_to_string(cgroup.path.join(file)).unwrap()
    }

    #[test]
    fn test_set_io_weight_absent_skipped_present_written() {
        let without = fake("noio", &[]);
        let r = Resources {
            io_weight: Some(4950),
            ..Resources::default()
        };
        without.set(&r).unwrap();
        assert!(!without.path.join("io.weight").exists());
        let with = fake("io", &["io.weight"]);
        with.set(&r).unwrap();
        assert_eq!(read(&with, "io.weight"), "4950");
    }

    #[test]
    fn test_set_unified_written_last_over_structured() {
        let cgroup = fake("unified", &["pids.max", "memory.high"]);
        let r = Resources {
            pids_max: Some(100),
            unified: [
                ("pids.max".to_owned(), "7".to_owned()),
                ("memory.high".to_owned(), "max".to_owned()),
            ]
            .into(),
            ..Resources::default()
        };
        cgroup.set(&r).unwrap();
        assert_eq!(read(&cgroup, "pids.max"), "7");
        assert_eq!(read(&cgroup, "memory.high"), "max");
    }

    #[test]
    fn test_set_unified_missing_file_error_names_key() {
        let cgroup = fake("missing", &[]);
        let r = Resources {
            unified: [("misc.max".to_owned(), "1".to_owned())].into(),
            ..Resources::default()
        };
        let err = cgroup.set(&r).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("unified \"misc.max\""), "{err}");
        assert!(!cgroup.path.join("misc.max").exists());
    }

    #[test]
    fn test_set_unified_unhonoured_controller_missing_skipped() {
        let cgroup = fake("optional", &[]);
        let r = Resources {
            unified: ["io.max", "hugetlb.2MB.max", "rdma.max", "memory.swap.max"]
                .into_iter()
                .map(|k| (k.to_owned(), "0".to_owned()))
                .collect(),
            ..Resources::default()
        };
        cgroup.set(&r).unwrap();
    }

    #[test]
    fn test_set_cpu_idle_leaves_weight_burst_after_max() {
        let cgroup = fake(
            "cpu",
            &["cpu.idle", "cpu.weight", "cpu.max", "cpu.max.burst"],
        );
        let r = Resources {
            cpu_idle: Some(true),
            cpu_weight: Some(39),
            cpu_quota_us: Some(50_000),
            cpu_burst_us: Some(20_000),
            ..Resources::default()
        };
        cgroup.set(&r).unwrap();
        assert_eq!(read(&cgroup, "cpu.idle"), "1");
        assert_eq!(read(&cgroup, "cpu.weight"), "");
        assert_eq!(read(&cgroup, "cpu.max"), "50000 100000");
        assert_eq!(read(&cgroup, "cpu.max.burst"), "20000");
    }
}
