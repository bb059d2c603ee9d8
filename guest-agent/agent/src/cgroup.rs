//! One cgroup v2 group per container under the guest's hierarchy (`/sys/fs/cgroup`, mounted
//! by [`crate::init`]): `containers/<id>`, with the memory, cpu, pids and cpuset controllers
//! enabled on the way. The agent creates it, writes the limits and moves container-init into
//! it before sending the spec, so that everything the container runs is limited and a
//! cgroup namespace made afterwards is rooted there. After the exit, `memory.events` tells
//! whether the OOM killer struck.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocol::{Resources, Stats};
use nix::unistd::Pid;

const ROOT: &str = "/sys/fs/cgroup";
const CONTAINERS: &str = "containers";
/// Controllers OCI resources map to (kernel-config/fragments/cgroups.config).
const CONTROLLERS: &str = "+cpu +cpuset +memory +pids";
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
        enable_controllers(Path::new(ROOT))?;
        mkdir(&parent)?;
        enable_controllers(&parent)?;
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

    /// Writes the limits `r` sets; the others stay as they are.
    pub fn set(&self, r: &Resources) -> io::Result<()> {
        let files = [
            ("memory.max", r.memory_max.map(|v| v.to_string())),
            ("memory.low", r.memory_low.map(|v| v.to_string())),
            ("pids.max", r.pids_max.map(|v| v.to_string())),
            ("cpu.weight", r.cpu_weight.map(|v| v.to_string())),
            ("cpu.max", r.cpu_max()),
            ("cpuset.cpus", r.cpuset_cpus.clone()),
            ("cpuset.mems", r.cpuset_mems.clone()),
        ];
        for (file, value) in files {
            if let Some(value) = value {
                self.write(file, &value)?;
            }
        }
        Ok(())
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
    /// only costs a directory in a VM that ends with the container).
    pub async fn remove(&self) {
        self.kill_all();
        for _ in 0..REMOVE_TRIES {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // The reaper (same thread) still has zombies of the container to collect.
                Err(_) => tokio::time::sleep(REMOVE_PAUSE).await,
            }
        }
        eprintln!("husk-agent: cgroup {} still busy", self.path.display());
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(|e| annotate(e, &path, &format!("write {value:?} to")))
    }
}

fn enable_controllers(dir: &Path) -> io::Result<()> {
    let path = dir.join("cgroup.subtree_control");
    std::fs::write(&path, CONTROLLERS)
        .map_err(|e| annotate(e, &path, &format!("write {CONTROLLERS:?} to")))
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
