//! Podman (Debian 12's 4.3, through conmon) and Docker (docker.io 20.10, through containerd's
//! runc shim) driving an OCI runtime by path, as a user would: `podman --runtime PATH`, and a
//! dockerd with `runtimes` naming husk (`--add-runtime`) and `docker run --runtime husk`. Each
//! [`Podman`] and [`Docker`] has its own storage, run directory, socket and runtime state under
//! a temporary directory, the [busybox image](super::oci_image) imported into it (no registry);
//! Podman uses `cgroupfs` and file events (no systemd here), dockerd no bridge and no iptables
//! (`--network none` scenarios) and the `vfs` storage driver.
//!
//! Every command runs with its output in files and a time limit: a detached container's conmon
//! may hold a pipe open, and a hung command must fail the test, not stall it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::oci_image::busybox_rootfs_tar;
use super::{husk_out, on_path, procs};

/// The image every scenario runs.
pub const IMAGE: &str = "localhost/husk-busybox:test";
/// How long one engine command may take (a husk VM boots under TCG here in 1-2 s).
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(90);
/// What this sandbox's missing CAP_SYS_RESOURCE needs of every container (even with runc).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// The OCI runtime an engine drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineRuntime {
    /// runc, the baseline.
    Runc,
    /// husk, the subject.
    Husk,
}

impl EngineRuntime {
    /// The runtime's binary.
    pub fn path(self) -> PathBuf {
        match self {
            Self::Runc => super::which("runc"),
            Self::Husk => husk_out().join("bin/husk"),
        }
    }
}

/// An engine under test: runs its CLI with `stdin`, within [`ENGINE_TIMEOUT`]; `run_flags`
/// are what `run` needs to use the runtime under test.
pub trait Engine: Sync {
    /// `<engine> <args>`.
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output;
    /// Flags `run` takes before the image to use the runtime under test.
    fn run_flags(&self) -> Vec<String>;
    /// Processes left that name the engine's directory (conmon, shims, the runtime's helpers).
    fn leftovers(&self) -> Vec<String>;
    /// `<engine> <args>` on a terminal of `rows` x `cols` (as a user types it; `script`
    /// makes the terminal), its output.
    fn on_terminal(&self, args: &[&str], rows: u16, cols: u16) -> Output;
}

/// Runs `cmd` on a new terminal of `rows` x `cols` (`script`), its output in files beside
/// `base`.
fn on_terminal(cmd: &Command, rows: u16, cols: u16, base: &Path) -> Output {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect();
    let script = format!("stty rows {rows} cols {cols}; exec {}", line.join(" "));
    let mut outer = Command::new("script");
    outer.args(["-qec", &script, "/dev/null"]);
    run_limited(outer, b"", base, ENGINE_TIMEOUT)
}

/// A private Podman with one runtime.
#[derive(Debug)]
pub struct Podman {
    dir: tempfile::TempDir,
    runtime: EngineRuntime,
}

impl Podman {
    /// A Podman running `runtime`, its image imported; `None` (with one `SKIPPED:` line) where
    /// podman or husk's build is missing.
    pub fn get(test: &str, runtime: EngineRuntime) -> Option<Self> {
        let missing = [
            (!on_path("podman")).then(|| "podman is not installed (make deps)".to_owned()),
            (!on_path("conmon")).then(|| "conmon is not installed (make deps)".to_owned()),
            (runtime == EngineRuntime::Husk && !husk_out().join("share/husk/vmlinux").exists())
                .then(|| format!("no husk build under {}", husk_out().display())),
        ];
        if let Some(reason) = missing.into_iter().flatten().next() {
            println!("SKIPPED: {test}: {reason}");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("husk-podman-")
            .tempdir()
            .expect("podman dir");
        let podman = Self { dir, runtime };
        import_image(&podman);
        Some(podman)
    }

    /// `podman <global flags> <args>`.
    pub fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--runtime")
            .arg(self.runtime.path())
            .args(args);
        cmd
    }
}

impl Engine for Podman {
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_limited(
            self.command(args),
            stdin,
            &self.dir.path().join("out"),
            ENGINE_TIMEOUT,
        )
    }

    fn run_flags(&self) -> Vec<String> {
        Vec::new()
    }

    fn leftovers(&self) -> Vec<String> {
        super::processes_mentioning(self.dir.path())
    }

    fn on_terminal(&self, args: &[&str], rows: u16, cols: u16) -> Output {
        let base = self.dir.path().join("tty");
        on_terminal(&self.command(args), rows, cols, &base)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"], b"");
        // Podman's storage holds overlay mounts; `system reset` unmounts and removes them.
        let _ = self.run(&["system", "reset", "--force"], b"");
        let dir = self.dir.path().to_string_lossy().into_owned();
        for p in procs::all().into_iter().filter(|p| p.mentions(&dir)) {
            p.kill();
        }
    }
}

/// A private dockerd (its own data root, exec root, socket and managed containerd) with runc
/// (its default) and husk as runtimes.
#[derive(Debug)]
pub struct Docker {
    dir: tempfile::TempDir,
    daemon: std::process::Child,
    runtime: EngineRuntime,
}

impl Docker {
    /// A dockerd whose containers run with `runtime`, the image imported; `None` (with one
    /// `SKIPPED:` line) where dockerd or husk's build is missing.
    pub fn get(test: &str, runtime: EngineRuntime) -> Option<Self> {
        let missing = [
            (!Path::new(DOCKER).exists() || !on_path("dockerd"))
                .then(|| "docker.io is not installed (make deps)".to_owned()),
            (!husk_out().join("share/husk/vmlinux").exists())
                .then(|| format!("no husk build under {}", husk_out().display())),
        ];
        if let Some(reason) = missing.into_iter().flatten().next() {
            println!("SKIPPED: {test}: {reason}");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("husk-docker-")
            .tempdir()
            .expect("docker dir");
        let d = dir.path();
        let log = std::fs::File::create(d.join("dockerd.log")).expect("dockerd log");
        let daemon = Command::new("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .args(["--storage-driver", "vfs"])
            .arg("--add-runtime")
            .arg(format!("husk={}", husk_out().join("bin/husk").display()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd");
        let docker = Self {
            dir,
            daemon,
            runtime,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker.run(&["version"], b"").status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(docker.dir.path().join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        import_image(&docker);
        Some(docker)
    }
}

/// Debian's docker CLI (another `docker` may come first on PATH).
const DOCKER: &str = "/usr/bin/docker";

impl Docker {
    /// `docker <args>` against this dockerd.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args);
        cmd
    }
}

impl Engine for Docker {
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let base = self.dir.path().join("out");
        run_limited(self.command(args), stdin, &base, ENGINE_TIMEOUT)
    }

    fn on_terminal(&self, args: &[&str], rows: u16, cols: u16) -> Output {
        let base = self.dir.path().join("tty");
        on_terminal(&self.command(args), rows, cols, &base)
    }

    fn run_flags(&self) -> Vec<String> {
        match self.runtime {
            EngineRuntime::Runc => vec!["--runtime".into(), "runc".into()],
            EngineRuntime::Husk => vec!["--runtime".into(), "husk".into()],
        }
    }

    fn leftovers(&self) -> Vec<String> {
        let daemon = self.daemon.id().to_string();
        super::processes_mentioning(self.dir.path())
            .into_iter()
            .filter(|p| !p.starts_with(&format!("{daemon}:")) && !p.contains("containerd.toml"))
            .collect()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let ids = self.run(&["ps", "-a", "-q"], b"");
        for id in super::text(&ids.stdout).split_whitespace() {
            let _ = self.run(&["rm", "-f", id], b"");
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.daemon.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let dir = self.dir.path().to_string_lossy().into_owned();
        for p in procs::all().into_iter().filter(|p| p.mentions(&dir)) {
            p.kill();
        }
        for mount in procs::mounts_mentioning(&dir).iter().rev() {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Imports the busybox rootfs as [`IMAGE`], `sh` its command.
fn import_image(engine: &dyn Engine) {
    let tar = busybox_rootfs_tar();
    let tar = tar.to_str().expect("utf-8");
    let imported = engine.run(&["import", "--change", "CMD [\"sh\"]", tar, IMAGE], b"");
    assert!(
        imported.status.success(),
        "import: {}",
        super::show(&imported)
    );
}

/// `run` of [`IMAGE`] running `cmd` with no network, [`ULIMITS`], the engine's `flags`
/// ([`Engine::run_flags`]) and `extra`.
pub fn run_args<'a>(flags: &'a [String], extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    run_args_on("none", flags, extra, cmd)
}

/// [`run_args`] on the engine's network `network`.
pub fn run_args_on<'a>(
    network: &'a str,
    flags: &'a [String],
    extra: &[&'a str],
    cmd: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["run", "--network", network];
    args.extend(flags.iter().map(String::as_str));
    args.extend(ULIMITS);
    args.extend(extra);
    args.push(IMAGE);
    args.extend(cmd);
    args
}

/// Runs `cmd` with `stdin`, its output in files beside `base`, killed after `timeout`.
fn run_limited(mut cmd: Command, stdin: &[u8], base: &Path, timeout: Duration) -> Output {
    // Commands may run side by side: each has files of its own.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = base.with_extension(format!("{call}.stdout"));
    let err_path = base.with_extension(format!("{call}.stderr"));
    let in_path = base.with_extension(format!("{call}.stdin"));
    std::fs::write(&in_path, stdin).expect("stdin file");
    let mut child = cmd
        .stdin(std::fs::File::open(&in_path).expect("stdin"))
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn engine command");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    for path in [out_path, err_path, in_path] {
        let _ = std::fs::remove_file(path);
    }
    out
}
