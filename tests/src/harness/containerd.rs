//! A private, real containerd (Debian 12's 1.6) for the shim's end-to-end tests, driven with
//! `ctr` as a user would: the same scenario runs under `io.containerd.runc.v2` (the oracle)
//! and `io.containerd.husk.v2` (the subject).
//!
//! [`Containerd::get`] starts a containerd with its own root, state, socket and generated
//! config in a temporary directory; containerd finds `containerd-shim-husk-v2` on its PATH,
//! which starts with `$HUSK_OUT/bin`. Each scenario gets a namespace of its own through
//! [`Containerd::ctr`], with the [busybox image](super::oci_image) imported into it. Dropping
//! the [`Containerd`] removes its tasks and containers, stops it and its shims, unmounts what
//! is left under its directory and prints its log when the test failed.
//!
//! Every `ctr` command runs with its output in files and a time limit: a detached task's shim
//! may inherit a pipe and hold it open, and a hung command must fail the test, not stall it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::oci_image::{busybox_image_tar, IMAGE, PAUSE_IMAGE};
use super::procs::{self, Proc};
use super::{husk_out, on_path, text};

/// How long one `ctr` command may take unless told otherwise (a husk VM boots under TCG
/// emulation here in 1-2 s; this leaves room for a loaded CI machine).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// A containerd runtime (shim v2) under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `io.containerd.runc.v2`, the baseline.
    Runc,
    /// `io.containerd.husk.v2`, the subject.
    Husk,
}

impl Runtime {
    /// The runtime type `ctr run --runtime` takes.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Runc => "io.containerd.runc.v2",
            Self::Husk => "io.containerd.husk.v2",
        }
    }

    /// A short name for messages and namespaces.
    pub fn label(self) -> &'static str {
        match self {
            Self::Runc => "runc",
            Self::Husk => "husk",
        }
    }

    /// Why this runtime cannot run here, if it cannot: for husk, the shim, the guest kernel
    /// and initramfs under `$HUSK_OUT`, QEMU and virtiofsd; runc is checked by
    /// [`Containerd::get`].
    pub fn missing(self) -> Option<String> {
        if self == Self::Runc {
            return None;
        }
        let out = husk_out();
        for file in [
            out.join("bin/containerd-shim-husk-v2"),
            out.join("share/husk/vmlinux"),
            out.join("share/husk/initramfs.cpio"),
        ] {
            if !file.is_file() {
                return Some(format!("{} is missing; run `make build`", file.display()));
            }
        }
        ["qemu-system-x86_64", "virtiofsd"]
            .into_iter()
            .find(|p| !on_path(p))
            .map(|p| format!("{p} is not installed; run `make deps`"))
    }
}

/// A private containerd; see the module documentation.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    namespaces: Mutex<Vec<String>>,
    commands: AtomicUsize,
}

impl Containerd {
    /// A running containerd, or `None` after printing `SKIPPED: <reason>` for `test` when
    /// this host cannot run one (not root, containerd, ctr or runc missing).
    ///
    /// # Panics
    /// When containerd is there but does not start.
    pub fn get(test: &str) -> Option<Self> {
        Self::get_with(test, false, None)
    }

    /// [`Containerd::get`] whose shims keep their boot snapshots in `store`
    /// (`HUSK_SNAPSHOT_STORE`) instead of the host's store.
    pub fn get_with_store(test: &str, store: &Path) -> Option<Self> {
        Self::get_with(test, false, Some(store))
    }

    /// [`Containerd::get`] with its CRI plugin serving on the same socket (handlers `runc`
    /// and `husk`, [`PAUSE_IMAGE`] as the sandbox image, a loopback-only CNI network), the
    /// images imported into CRI's `k8s.io` namespace.
    pub fn get_cri(test: &str) -> Option<Self> {
        let containerd = Self::get_with(test, true, None)?;
        drop(containerd.cri_ctr());
        Some(containerd)
    }

    /// A `ctr` in CRI's namespace, with the images imported (ctr's `--runtime` is unused
    /// there: CRI picks the shim by handler).
    ///
    /// # Panics
    /// When the import fails.
    pub fn cri_ctr(&self) -> Ctr<'_> {
        self.ctr_in(Runtime::Runc, CRI_NAMESPACE.to_owned())
    }

    fn get_with(test: &str, cri: bool, store: Option<&Path>) -> Option<Self> {
        let mut needed = vec!["containerd", "ctr", "containerd-shim-runc-v2", "runc"];
        if cri {
            needed.push(CNI_PTP);
        }
        let missing = needed.into_iter().find(|p| {
            !on_path(p) && !Path::new("/usr/sbin").join(p).is_file() && !Path::new(p).is_file()
        });
        let reason = match missing {
            Some(p) => format!("{p} is not installed; run `make deps`"),
            None if !nix::unistd::geteuid().is_root() => "containerd needs root".to_owned(),
            None => return Some(Self::start(cri, store)),
        };
        println!("SKIPPED: {test}: {reason}");
        None
    }

    /// Starts containerd (with its CRI plugin if `cri`, its shims' snapshot store `store` if
    /// given) and waits (up to 20 s) until `ctr version` answers.
    ///
    /// # Panics
    /// When it cannot be spawned or does not answer in time (the log is printed).
    pub fn start(cri: bool, store: Option<&Path>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("husk-containerd-")
            .tempdir()
            .expect("containerd dir");
        std::fs::create_dir_all(dir.path().join("out")).expect("output dir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), cri)).expect("config.toml");
        if cri {
            let net_d = dir.path().join("cni/net.d");
            std::fs::create_dir_all(&net_d).expect("CNI config dir");
            std::fs::write(
                net_d.join("10-husk-test.conflist"),
                cni_conflist(dir.path()),
            )
            .expect("CNI config");
        }
        let log = File::create(dir.path().join("containerd.log")).expect("log");
        let share = husk_out().join("share/husk");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", shim_path())
            .env("HUSK_KERNEL", share.join("vmlinux"))
            .env("HUSK_INITRAMFS", share.join("initramfs.cpio"));
        if let Some(store) = store {
            cmd.env("HUSK_SNAPSHOT_STORE", store);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let containerd = Self {
            dir,
            child,
            namespaces: Mutex::new(Vec::new()),
            commands: AtomicUsize::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !containerd
            .command("default", &["version"])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        containerd
    }

    /// What containerd and its shims logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Its gRPC socket (`ctr -a`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Its state directory (`--state`): task bundles live in
    /// `io.containerd.runtime.v2.task/<namespace>/<id>`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A `ctr` for `runtime` in namespace `<scenario>-<runtime>`, with the busybox image
    /// imported.
    ///
    /// # Panics
    /// When the import fails.
    pub fn ctr(&self, runtime: Runtime, scenario: &str) -> Ctr<'_> {
        self.ctr_in(runtime, format!("{scenario}-{}", runtime.label()))
    }

    /// A `ctr` in namespace `ns`; the images are imported the first time.
    fn ctr_in(&self, runtime: Runtime, ns: String) -> Ctr<'_> {
        let known = {
            let mut namespaces = self.namespaces.lock().expect("lock");
            let known = namespaces.contains(&ns);
            if !known {
                namespaces.push(ns.clone());
            }
            known
        };
        let ctr = Ctr {
            containerd: self,
            ns,
            runtime,
        };
        if known {
            return ctr;
        }
        let tar = busybox_image_tar().to_str().expect("utf-8 path");
        let out = ctr.ctr(&["images", "import", tar]);
        assert!(
            out.status.success(),
            "ctr images import: {}",
            text(&out.stderr)
        );
        ctr
    }

    /// `ctr -a <socket> -n <ns> <args>`, not yet spawned.
    fn command(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", ns]).args(args);
        // ctr's default, said once here: the snapshotter is a client choice in containerd 1.6.
        cmd.env("CONTAINERD_SNAPSHOTTER", "overlayfs");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Two fresh output files for a command.
    fn output_files(&self, ns: &str) -> (PathBuf, PathBuf) {
        let n = self.commands.fetch_add(1, Ordering::Relaxed);
        let base = self.dir.path().join("out").join(format!("{ns}-{n}"));
        (base.with_extension("out"), base.with_extension("err"))
    }

    /// The shims this containerd started (found by the `-address <socket>` they were given).
    fn shims(&self) -> Vec<Proc> {
        let socket = self.socket();
        let socket = socket.to_string_lossy();
        procs::all()
            .into_iter()
            .filter(|p| p.name.starts_with("containerd-shim"))
            .filter(|p| {
                p.argv
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == socket)
            })
            .collect()
    }

    /// Best effort: kill and delete every task and container in our namespaces. Never
    /// panics (it runs in `drop`, maybe while a test panics).
    fn remove_containers(&self) {
        let namespaces = self
            .namespaces
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        for ns in &namespaces {
            let ctr = Ctr {
                containerd: self,
                ns: ns.clone(),
                runtime: Runtime::Runc,
            };
            let tasks = ctr.try_run(&["task", "ls"]).map(|o| parse_tasks(&o.stdout));
            for task in tasks.unwrap_or_default() {
                let _ = ctr.try_run(&["task", "kill", "-s", "KILL", &task.id]);
                let _ = ctr.try_run(&["task", "delete", "--force", &task.id]);
            }
            let list = ctr
                .try_run(&["containers", "ls", "-q"])
                .unwrap_or_else(|| Output {
                    status: ExitStatus::default(),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                });
            for id in text(&list.stdout).split_whitespace() {
                let _ = ctr.try_run(&["containers", "delete", id]);
            }
        }
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Shims outlive containerd by design; what is left of ours goes now, children first.
        for shim in self.shims() {
            for p in procs::descendants(shim.pid) {
                p.kill();
            }
            shim.kill();
        }
    }

    /// Lazily unmounts everything below our directory, deepest first.
    fn unmount_all(&self) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = procs::mounts_mentioning(&dir)
            .into_iter()
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_containers();
        self.stop();
        self.unmount_all();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "---- containerd log (last {} lines) ----\n{}\n---- end of containerd log ----",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// CRI's containerd namespace.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// A CNI plugin the CRI tests' network uses (Debian's containernetworking-plugins).
const CNI_PTP: &str = "/usr/lib/cni/ptp";

/// The CRI tests' pod network: a veth pair per pod (`ptp`) with an address from a private
/// range kept in our directory, no masquerading; CRI needs a pod IP to start a sandbox. The
/// range differs per test process, so that what a failed run left cannot answer for a pod.
fn cni_conflist(dir: &Path) -> String {
    let subnet = format!("10.254.{}.0/24", 16 + std::process::id() % 224);
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "husk-test",
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": subnet,
                "dataDir": dir.join("cni/ipam"),
            },
        }],
    })
    .to_string()
}

/// containerd's config (version 2): our root, state and socket, debug logs (shims log
/// through containerd), no snapshotters this host cannot use; CRI only if `cri`.
fn config_toml(dir: &Path, cri: bool) -> String {
    let d = dir.display();
    let cri_plugin = match cri {
        true => "",
        false => "\n  \"io.containerd.grpc.v1.cri\",",
    };
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{cri_plugin}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

# ctr names the runtime type itself (`--runtime io.containerd.husk.v2` runs
# `containerd-shim-husk-v2` from PATH); CRI takes a handler from these.
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No oom_score_adj below containerd's own: some CI hosts refuse a negative one (CRI gives
  # sandboxes -998), which runc cannot then start.
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
"#
    )
}

/// `$HUSK_OUT/bin:` + PATH, so that containerd finds `containerd-shim-husk-v2`.
fn shim_path() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(husk_out().join("bin")).chain(std::env::split_paths(&path));
    std::env::join_paths(dirs).expect("PATH")
}

/// The rows of `ctr task ls`' output (a header line, then `TASK PID STATUS`).
fn parse_tasks(stdout: &[u8]) -> Vec<Task> {
    text(stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            Some(Task {
                id: cols.next()?.to_owned(),
                pid: cols.next()?.parse().ok()?,
                status: cols.next()?.to_owned(),
            })
        })
        .collect()
}

/// One row of `ctr task ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The container id.
    pub id: String,
    /// The pid the shim reports for its init process.
    pub pid: u32,
    /// `RUNNING`, `STOPPED`, `PAUSED`, `CREATED`, ...
    pub status: String,
}

/// `ctr` in one namespace of a [`Containerd`], for one runtime.
#[derive(Debug)]
pub struct Ctr<'a> {
    containerd: &'a Containerd,
    ns: String,
    runtime: Runtime,
}

impl Ctr<'_> {
    /// The runtime `run` starts containers with.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The containerd.
    pub fn containerd(&self) -> &Containerd {
        self.containerd
    }

    /// `ctr -a S -n NS <args>` with stdio null, not yet spawned.
    pub fn command(&self, args: &[&str]) -> Command {
        self.containerd.command(&self.ns, args)
    }

    /// Runs `ctr <args>` to its end, in at most [`CTR_TIMEOUT`].
    ///
    /// # Panics
    /// When ctr cannot be spawned or takes longer (it is killed first).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.run_for(args, CTR_TIMEOUT)
    }

    /// Runs `ctr <args>` to its end, in at most `limit`.
    ///
    /// # Panics
    /// As [`Ctr::ctr`].
    pub fn run_for(&self, args: &[&str], limit: Duration) -> Output {
        let mut spawned = self.spawn(args, Stdio::null());
        spawned
            .wait_for(limit)
            .unwrap_or_else(|| panic!("{}: `ctr {}` took over {limit:?}", self.ns, args.join(" ")))
    }

    /// The arguments of `ctr run [flags] --runtime R IMAGE id cmd...`.
    pub fn run_args<'s>(&self, flags: &[&'s str], id: &'s str, cmd: &[&'s str]) -> Vec<&'s str> {
        let mut args = vec!["run", "--runtime", self.runtime.type_name()];
        args.extend_from_slice(flags);
        args.extend([IMAGE, id]);
        args.extend_from_slice(cmd);
        args
    }

    /// `ctr run [flags] --runtime R IMAGE id cmd...` to its end, in at most [`CTR_TIMEOUT`].
    ///
    /// # Panics
    /// As [`Ctr::ctr`].
    pub fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        self.ctr(&self.run_args(flags, id, cmd))
    }

    /// Spawns `ctr <args>` with `stdin` and its stdout and stderr going to files.
    ///
    /// # Panics
    /// When ctr cannot be spawned.
    pub fn spawn(&self, args: &[&str], stdin: Stdio) -> Spawned {
        let (out, err) = self.containerd.output_files(&self.ns);
        let child = self
            .command(args)
            .stdin(stdin)
            .stdout(File::create(&out).expect("stdout file"))
            .stderr(File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn ctr");
        Spawned { child, out, err }
    }

    /// `ctr task ls`, parsed.
    ///
    /// # Panics
    /// As [`Ctr::ctr`].
    pub fn tasks(&self) -> Vec<Task> {
        parse_tasks(&self.ctr(&["task", "ls"]).stdout)
    }

    /// `ctr <args>` with a 15 s limit, `None` when it could not run or took longer.
    fn try_run(&self, args: &[&str]) -> Option<Output> {
        let (out, err) = self.containerd.output_files(&self.ns);
        let child = self
            .command(args)
            .stdout(File::create(&out).ok()?)
            .stderr(File::create(&err).ok()?)
            .spawn()
            .ok()?;
        Spawned { child, out, err }.wait_for(Duration::from_secs(15))
    }

    /// The task's row in `ctr task ls`, if it has one.
    pub fn task(&self, id: &str) -> Option<Task> {
        self.tasks().into_iter().find(|t| t.id == id)
    }

    /// Polls `ctr task ls` until `done(status)` (`None`: no task) holds or `limit` passes;
    /// returns the last status seen.
    pub fn await_status(
        &self,
        id: &str,
        done: impl Fn(Option<&str>) -> bool,
        limit: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.task(id).map(|t| t.status);
            if done(status.as_deref()) || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr run -d` of `cmd` in container `id`, then waits until it is RUNNING.
    ///
    /// # Panics
    /// When `run -d` fails or the task is not RUNNING within [`CTR_TIMEOUT`].
    pub fn run_detached(&self, flags: &[&str], id: &str, cmd: &[&str]) {
        let mut all = vec!["-d"];
        all.extend_from_slice(flags);
        let out = self.run(&all, id, cmd);
        assert!(
            out.status.success(),
            "{}: `ctr run -d {id}`: expected success, seen {}: {}",
            self.runtime.label(),
            out.status,
            text(&out.stderr)
        );
        let status = self.await_status(id, |s| s == Some("RUNNING"), CTR_TIMEOUT);
        assert_eq!(
            status.as_deref(),
            Some("RUNNING"),
            "{}: task {id} after `run -d`: expected RUNNING, seen {status:?}",
            self.runtime.label()
        );
    }

    /// The shim serving container `id`: the shim process this containerd started for this
    /// namespace whose `-id` is `id` or, for a container grouped into a pod, the pod's
    /// sandbox id given as `group`.
    pub fn shim(&self, group: &str) -> Option<Proc> {
        self.shims()
            .into_iter()
            .find(|p| p.argv.windows(2).any(|w| w[0] == "-id" && w[1] == group))
    }

    /// Every shim this containerd started for this namespace (`-namespace <ns>`).
    pub fn shims(&self) -> Vec<Proc> {
        self.containerd
            .shims()
            .into_iter()
            .filter(|p| {
                p.argv
                    .windows(2)
                    .any(|w| w[0] == "-namespace" && w[1] == self.ns)
            })
            .collect()
    }

    /// The task's bundle directory, where containerd keeps the shim's `address`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.containerd
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(&self.ns)
            .join(id)
    }
}

/// A spawned `ctr` whose output goes to files; killed when dropped unfinished.
#[derive(Debug)]
pub struct Spawned {
    /// The ctr process.
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Spawned {
    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits up to `limit` for it to exit; `None` (after killing it) when it did not.
    pub fn wait_for(&mut self, limit: Duration) -> Option<Output> {
        let status = self.wait_status(limit)?;
        Some(Output {
            status,
            stdout: std::fs::read(&self.out).unwrap_or_default(),
            stderr: std::fs::read(&self.err).unwrap_or_default(),
        })
    }

    fn wait_status(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(_) => return None,
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls its stdout until it contains `needle`, for at most `limit`.
    pub fn await_stdout(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.stdout().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
