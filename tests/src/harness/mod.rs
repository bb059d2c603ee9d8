//! The e2e harness: locate husk and the guest artifacts, build bundles, run husk, check leftovers.
//!
//! A test that cannot run on this host calls [`Env::get`], which prints one
//! `SKIPPED: <reason>` line and returns `None`; it never passes silently otherwise.

mod bundle;
pub mod containerd;
pub mod cri;
pub mod engines;
pub mod nested;
pub mod oci_image;
pub mod procs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub use bundle::{which, TestBundle};

/// Where husk and its guest artifacts are.
#[derive(Debug, Clone)]
pub struct Env {
    /// The `husk` binary.
    pub husk: PathBuf,
    /// `share/husk` with vmlinux and initramfs.cpio.
    pub share: PathBuf,
}

impl Env {
    /// The environment, or `None` after printing `SKIPPED: <reason>` for `test`.
    pub fn get(test: &str) -> Option<Self> {
        match Self::find() {
            Ok(env) => Some(env),
            Err(reason) => {
                println!("SKIPPED: {test}: {reason}");
                None
            }
        }
    }

    fn find() -> Result<Self, String> {
        let out = husk_out();
        let env = Self {
            husk: out.join("bin/husk"),
            share: out.join("share/husk"),
        };
        for file in [
            &env.husk,
            &env.share.join("vmlinux"),
            &env.share.join("initramfs.cpio"),
        ] {
            if !file.is_file() {
                return Err(format!(
                    "{} is missing; run `make build` (or `make test`)",
                    file.display()
                ));
            }
        }
        if !nix::unistd::geteuid().is_root() {
            return Err("husk needs root (virtiofsd, namespaces)".into());
        }
        for program in ["qemu-system-x86_64", "virtiofsd", "busybox"] {
            if !on_path(program) {
                return Err(format!("{program} is not installed; run `make deps`"));
            }
        }
        Ok(env)
    }

    /// A fresh husk with its own state root.
    pub fn husk(&self) -> Husk {
        self.husk_with_prefix("husk-e2e-")
    }

    /// A husk whose state root is a long path (over 130 bytes), as engines' roots are.
    pub fn husk_long_root(&self) -> Husk {
        self.husk_with_prefix(&format!("husk-e2e-{}-", "long".repeat(30)))
    }

    fn husk_with_prefix(&self, prefix: &str) -> Husk {
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("state root");
        Husk {
            env: self.clone(),
            root,
        }
    }
}

/// `$HUSK_OUT`, where `make build` installs husk (`bin/`) and the guest artifacts
/// (`share/husk/`); `out/` at the workspace root when unset.
pub fn husk_out() -> PathBuf {
    std::env::var_os("HUSK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../out"))
}

/// The middle value of `v` (the upper one of an even count), for the benches' medians.
///
/// # Panics
/// When `v` is empty.
pub fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Command output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A container id no other process on the host mentions (leftover checks search for it).
pub fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// Exit code, stdout and stderr of a finished command, for messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "{:?} stdout {:?} stderr {:?}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Whether `program` is a file in one of PATH's directories.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// One husk state root; every container of a test runs under it.
#[derive(Debug)]
pub struct Husk {
    env: Env,
    root: tempfile::TempDir,
}

impl Husk {
    /// The state root (`--root`).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `husk --root R <args>` with the guest artifacts, ready to spawn.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.env.husk);
        cmd.arg("--root").arg(self.root.path());
        cmd.env("HUSK_KERNEL", self.env.share.join("vmlinux"));
        cmd.env("HUSK_INITRAMFS", self.env.share.join("initramfs.cpio"));
        cmd.args(args);
        cmd
    }

    /// `husk run --bundle B ID`, stdin fed from `stdin` (empty: closed at once).
    pub fn run(&self, bundle: &TestBundle, id: &str, stdin: &[u8]) -> Output {
        let mut child = self.spawn_run(bundle, id, &[]);
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("husk run");
        writer.join().expect("stdin writer");
        out
    }

    /// Spawns `husk run [extra] --bundle B ID` with piped stdio.
    pub fn spawn_run(&self, bundle: &TestBundle, id: &str, extra: &[&str]) -> Child {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend(["--bundle", bundle.path().to_str().expect("utf-8 path"), id]);
        self.command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn husk")
    }

    /// `pid: cmdline` of every process naming this husk's state root or the VM directory of
    /// its container `id` (the VM's sockets: QEMU, virtiofsd and the serial relay name it).
    pub fn processes_of(&self, id: &str) -> Vec<String> {
        let mut found = processes_mentioning(self.root.path());
        for p in processes_mentioning(&husk_sandbox::vm_dir(&self.root.path().join(id))) {
            if !found.contains(&p) {
                found.push(p);
            }
        }
        found
    }

    /// Panics if anything of this husk is left: its state directories (sockets, logs) or a
    /// process (QEMU, virtiofsd, husk) whose command line names the state root.
    pub fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root.path())
            .expect("state root")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "state left behind: {left:?}");
        let procs = processes_mentioning(self.root.path());
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
    }
}

/// `pid: cmdline` of every process whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// stdout of `out` as text.
pub fn stdout(out: &Output) -> String {
    text(&out.stdout)
}

/// stderr of `out` as text.
pub fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

/// The body `GET http://<addr>/<path>` answers, from the network namespace at `netns` (the
/// test's own without one), tried until `within` is over; `None` if it never answered.
pub fn http_get(
    netns: Option<&Path>,
    addr: &str,
    path: &str,
    within: std::time::Duration,
) -> Option<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let netns = netns.map(Path::to_owned);
        let (addr_, path_) = (addr.to_owned(), path.to_owned());
        // setns(2) moves only the calling thread: a thread of its own.
        let got = std::thread::spawn(move || -> std::io::Result<String> {
            use std::io::Read;
            if let Some(ns) = netns {
                let file = std::fs::File::open(&ns)?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            let target: std::net::SocketAddr = addr_.parse().map_err(std::io::Error::other)?;
            let step = std::time::Duration::from_secs(2);
            let mut conn = std::net::TcpStream::connect_timeout(&target, step)?;
            conn.set_read_timeout(Some(step))?;
            write!(conn, "GET /{path_} HTTP/1.0\r\nHost: {addr_}\r\n\r\n")?;
            let mut answer = String::new();
            conn.read_to_string(&mut answer)?;
            match answer.split_once("\r\n\r\n") {
                Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                    Ok(body.to_owned())
                }
                _ => Err(std::io::Error::other(format!("answer: {answer:?}"))),
            }
        })
        .join();
        match got {
            Ok(Ok(body)) => return Some(body),
            _ if std::time::Instant::now() > deadline => return None,
            _ => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}
