//! What a validation test can leave behind, removed after each run: the runtime's containers
//! (`list -q`, then `delete --force`), processes of the run (their command line or environment
//! names the run's directory: the runtime's state root, `TMPDIR`), mounts under that directory,
//! and the `cgrouptest` cgroups the suite creates, both absolute (`/cgrouptest`) and relative
//! (`testdir/cgrouptest/container`, below the caller's cgroup or a hierarchy's root).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::procs::{self, Proc};

use super::run::wait_deadline;

/// How long one `list` or `delete --force` of the cleanup may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Names the suite gives its cgroups (`cgroups.AbsCgroupPath`, `cgroups.RelCgroupPath`).
const CGROUP_TREES: [&str; 2] = ["cgrouptest", "testdir/cgrouptest"];

/// Removes everything of one run: containers under `runtime` (the run's wrapper), processes
/// and mounts naming `dir`, the suite's cgroups. Best effort: a failure here shows up as a
/// leftover in CI's final check, not as a test verdict.
pub fn run_leftovers(runtime: &Path, dir: &Path) {
    for id in list(runtime) {
        let _ = quiet(Command::new(runtime).args(["delete", "--force", &id]));
    }
    kill_processes_of(dir);
    unmount_under(dir);
    remove_suite_cgroups();
}

/// Container ids the runtime lists (none when `list` fails or hangs).
fn list(runtime: &Path) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let Ok(mut child) = Command::new(runtime)
        .args(["list", "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
    else {
        return Vec::new();
    };
    let stdout = child.stdout.take();
    if wait_deadline(child, COMMAND_TIMEOUT).is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    if let Some(mut out) = stdout {
        let _ = out.read_to_string(&mut text);
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Runs `cmd` with no output and [`COMMAND_TIMEOUT`].
fn quiet(cmd: &mut Command) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    wait_deadline(child, COMMAND_TIMEOUT).map(|_| ())
}

/// SIGKILLs every process whose command line or environment names `dir`, then waits (up to
/// 5 s) until they are gone.
fn kill_processes_of(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let found: Vec<Proc> = procs::all()
        .into_iter()
        .filter(|p| p.pid != me && (p.mentions(&needle) || environ_mentions(p.pid, &needle)))
        .collect();
    for p in &found {
        p.kill();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while found.iter().any(Proc::alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn environ_mentions(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| String::from_utf8_lossy(&env).contains(needle))
}

/// Lazily unmounts (deepest first) whatever this mount namespace has under `dir`.
fn unmount_under(dir: &Path) {
    let mut mounts = procs::mounts_mentioning(&dir.to_string_lossy());
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes the suite's cgroup trees under every hierarchy, at its root and below this
/// process's own cgroup there.
pub fn remove_suite_cgroups() {
    for base in cgroup_bases() {
        for tree in CGROUP_TREES {
            remove_cgroup_tree(&base.join(tree));
        }
        let _ = fs::remove_dir(base.join("testdir"));
    }
}

/// Each hierarchy's root and this process's cgroup in it (cgroup v1, the hybrid layout's
/// `unified`, or a pure v2 mount at /sys/fs/cgroup).
fn cgroup_bases() -> Vec<PathBuf> {
    let top = Path::new("/sys/fs/cgroup");
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let hierarchies: Vec<PathBuf> = if top.join("cgroup.controllers").is_file() {
        vec![top.to_path_buf()]
    } else {
        fs::read_dir(top)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let mut bases = Vec::new();
    for h in hierarchies {
        if let Some(path) = own_path(&own, &h, top) {
            bases.push(h.join(path.trim_start_matches('/')));
        }
        bases.push(h);
    }
    bases
}

/// This process's path in hierarchy `h` from /proc/self/cgroup (`ID:controllers:path`).
fn own_path(own: &str, h: &Path, top: &Path) -> Option<String> {
    let name = h.file_name()?.to_string_lossy().into_owned();
    own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let is_v2 = controllers.is_empty() && (h == top || name == "unified");
        let matches = controllers
            .split(',')
            .any(|c| c.trim_start_matches("name=") == name);
        (is_v2 || matches).then(|| path.to_owned())
    })
}

/// Removes cgroup directory `path` and its children, deepest first, killing any process
/// still in them.
fn remove_cgroup_tree(path: &Path) {
    if !path.is_dir() {
        return;
    }
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::remove_dir(path).is_err() && Instant::now() < deadline {
        for pid in fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Some(p) = pid.trim().parse().ok().and_then(Proc::read) {
                p.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
