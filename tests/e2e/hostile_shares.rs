//! A hostile guest against husk's virtio-fs shares (issue 12, items 1 and 2). The guest kernel
//! is assumed compromised; a privileged container stands in for it: it mounts the virtio-fs
//! tags itself, ignoring the read-only flags the agent gave the container.
//!
//! Scenarios: a privileged container with a read-only rootfs, a read-only bind of a host
//! directory and a read-only bind of one host file writes every share it can mount, through
//! `husk run` and in a pod under containerd (the host is unchanged, the bound file's siblings
//! are unseen); a setuid-root file the guest makes in a pod's share is no privilege for a host
//! user; a pod guest plants symlinks where the shim builds and removes a container's share
//! (nothing is mounted, unmounted or deleted outside the share); a sandbox id of `../x` is
//! refused before any path is made of it.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime, CTR_TIMEOUT};
use husk_e2e::harness::{procs, show, stderr, stdout, text, unique, Env, TestBundle};
use serde_json::json;

/// Where the shim keeps its pods (runtime/shim/src/shim.rs).
const SHIM_RUN_ROOT: &str = "/run/husk-shim";

/// Host files the guest may read but not change: a directory bound read-only, and a
/// directory one of whose files is bound read-only (its sibling must stay unseen).
struct HostFiles {
    dir: tempfile::TempDir,
}

impl HostFiles {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("husk-hostile-")
            .tempdir()
            .expect("host dir");
        std::fs::create_dir(dir.path().join("ro")).expect("mkdir");
        std::fs::write(dir.path().join("ro/keep"), "read-only dir\n").expect("write");
        std::fs::create_dir(dir.path().join("files")).expect("mkdir");
        std::fs::write(dir.path().join("files/bound"), "bound file\n").expect("write");
        std::fs::write(dir.path().join("files/secret"), "sibling\n").expect("write");
        Self { dir }
    }

    fn ro_dir(&self) -> PathBuf {
        self.dir.path().join("ro")
    }

    fn bound_file(&self) -> PathBuf {
        self.dir.path().join("files/bound")
    }

    /// Every file under the directory with its content, to compare before and after.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        let mut all = Vec::new();
        for sub in ["ro", "files"] {
            let dir = self.dir.path().join(sub);
            for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all.push((entry.path(), content));
            }
        }
        all.sort();
        all
    }
}

/// The attack, as a shell script: mounts each tag of `tags` under a tmpfs at /tmp (the rootfs
/// is read-only) and tries to write everything below it, then lists every directory holding a
/// bound file. Prints `MOUNTED <tag>`, `WROTE <path>` and `LS <dir>: <names>` lines.
fn attack_script(tags: &str) -> String {
    format!(
        "mount -t tmpfs t /tmp; \
         for t in {tags}; do mkdir /tmp/$t; \
           mount -t virtiofs $t /tmp/$t 2>/dev/null || continue; echo MOUNTED $t; \
           mount -o remount,rw /tmp/$t 2>/dev/null; \
           for d in $(find /tmp/$t -maxdepth 4 -type d 2>/dev/null); do \
             echo pwned > $d/pwned 2>/dev/null && echo WROTE $d; \
             [ -e $d/bound ] && echo LS $d: $(ls -A $d); \
             [ -e $d/bound ] && echo x >> $d/bound 2>/dev/null && echo WROTE $d/bound; \
             [ -e $d/keep ] && echo x >> $d/keep 2>/dev/null && echo WROTE $d/keep; \
           done; \
         done; true"
    )
}

/// What the attack printed that shows a breach: writes to read-only shares, and listings of a
/// bound file's directory that show more than the file.
fn breaches(out: &str, allowed_writes: &[&str]) -> Vec<String> {
    out.lines()
        .filter(|l| {
            let wrote = l
                .strip_prefix("WROTE ")
                .is_some_and(|p| !allowed_writes.contains(&p));
            let listed = l.starts_with("LS ") && l.contains("secret");
            wrote || listed
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn test_hostile_shares_cli_privileged_guest_cannot_write_ro_shares_or_see_siblings() {
    let test = "test_hostile_shares_cli_privileged_guest_cannot_write_ro_shares_or_see_siblings";
    let Some(env) = Env::get(test) else {
        return;
    };
    let husk = env.husk();
    let host = HostFiles::new();
    let before = host.snapshot();
    let script = attack_script("rootfs binds pod");
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", &script]);
    let rootfs_before = listing(&bundle.path().join("rootfs"));
    bundle.edit(|c| {
        c["root"]["readonly"] = true.into();
        let caps: Vec<_> = husk_sandbox::features::CAPABILITIES.iter().map(|c| json!(c)).collect();
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone().into();
        }
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.push(json!({
            "destination": "/ro", "type": "bind", "source": host.ro_dir(), "options": ["rbind", "ro"]
        }));
        mounts.push(json!({
            "destination": "/bound", "type": "bind", "source": host.bound_file(),
            "options": ["bind", "ro"]
        }));
    });
    let out = husk.run(&bundle, "hostile", b"");
    let seen = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{seen}\nstderr: {}",
        stderr(&out)
    );
    for tag in ["rootfs", "binds"] {
        assert!(
            seen.contains(&format!("MOUNTED {tag}\n")),
            "{tag} not mounted: {seen}"
        );
    }
    assert!(seen.contains("LS /tmp/binds/1: bound\n"), "{seen}");
    assert_eq!(breaches(&seen, &[]), Vec::<String>::new(), "{seen}");
    assert_eq!(host.snapshot(), before, "the host's files changed");
    // The bind destinations are made on the host, as runc makes them; nothing else.
    let mut rootfs_after = listing(&bundle.path().join("rootfs"));
    rootfs_after.retain(|n| n != "ro" && n != "bound");
    assert_eq!(rootfs_after, rootfs_before);
    husk.assert_clean();
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A containerd for husk only (the host's properties are checked, not a runc diff), or
/// `SKIPPED`.
fn containerd(test: &str) -> Option<Containerd> {
    let containerd = Containerd::get(test)?;
    if let Some(reason) = Runtime::Husk.missing() {
        println!("SKIPPED: {test}: {reason}");
        return None;
    }
    Some(containerd)
}

/// The `--annotation` flags that put a container in pod `pod`.
fn pod_flags(pod: &str, sandbox: bool) -> Vec<String> {
    let kind = if sandbox { "sandbox" } else { "container" };
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

/// `ctr run -d` of a sleeping pod sandbox with `extra` flags.
fn start_pod(ctr: &Ctr<'_>, pod: &str, extra: &[&str]) {
    let mut flags = pod_flags(pod, true);
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ctr.run_detached(&flags, pod, &["sleep", "1000"]);
}

/// Kills and deletes task and container `id`, whatever state it is in.
fn remove(ctr: &Ctr<'_>, id: &str) {
    let _ = ctr.ctr(&["task", "kill", "-s", "KILL", id]);
    let _ = ctr.await_status(id, |s| s != Some("RUNNING"), CTR_TIMEOUT);
    let _ = ctr.ctr(&["task", "delete", id]);
    let _ = ctr.ctr(&["container", "delete", id]);
}

/// One exec in `id` as a shell script; its output.
fn exec(ctr: &Ctr<'_>, id: &str, exec_id: &str, script: &str) -> String {
    let out = ctr.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
    assert!(out.status.success(), "exec in {id}: {}", show(&out));
    text(&out.stdout)
}

/// The pod's directory on the host.
fn pod_dir(ctr: &Ctr<'_>, pod: &str) -> PathBuf {
    Path::new(SHIM_RUN_ROOT).join(ctr.namespace()).join(pod)
}

#[test]
fn test_hostile_shares_pod_privileged_guest_cannot_write_ro_shares_or_see_siblings() {
    let test = "test_hostile_shares_pod_privileged_guest_cannot_write_ro_shares_or_see_siblings";
    let Some(containerd) = containerd(test) else {
        return;
    };
    let ctr = containerd.ctr(Runtime::Husk, "hostile-ro");
    let host = HostFiles::new();
    let before = host.snapshot();
    let pod = unique("ropod");
    start_pod(&ctr, &pod, &["--read-only"]);
    let app = unique("roapp");
    let ro = format!(
        "type=bind,src={},dst=/ro,options=rbind:ro",
        host.ro_dir().display()
    );
    let file = format!(
        "type=bind,src={},dst=/bound,options=bind:ro",
        host.bound_file().display()
    );
    let mut flags = pod_flags(&pod, false);
    let extra = [
        "--rm",
        "--read-only",
        "--cap-add",
        "CAP_SYS_ADMIN",
        "--mount",
        &ro,
        "--mount",
        &file,
    ];
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let script = attack_script("pod rootfs binds");
    let out = ctr.run(&flags, &app, &["sh", "-c", &script]);
    let seen = text(&out.stdout);
    let sandbox_rootfs = ctr.bundle(&pod).join("rootfs");
    let sandbox_pwned = sandbox_rootfs.join("pwned").exists();
    remove(&ctr, &pod);
    println!("{test}: the attack saw:\n{seen}");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(seen.contains("MOUNTED pod\n"), "{seen}");
    assert!(
        seen.contains(&format!("LS /tmp/pod/{app}/binds/1: bound\n")),
        "{seen}"
    );
    // The share's own directory is the guest's to write (it lives in the pod's 0700 tree).
    assert_eq!(
        breaches(&seen, &["/tmp/pod"]),
        Vec::<String>::new(),
        "{seen}"
    );
    assert!(
        !sandbox_pwned,
        "the sandbox's read-only rootfs was written: {seen}"
    );
    assert_eq!(host.snapshot(), before, "the host's files changed");
}

#[test]
fn test_hostile_shares_pod_guest_setuid_file_no_privilege_for_host_users() {
    let test = "test_hostile_shares_pod_guest_setuid_file_no_privilege_for_host_users";
    let Some(containerd) = containerd(test) else {
        return;
    };
    let ctr = containerd.ctr(Runtime::Husk, "hostile-suid");
    let pod = unique("suidpod");
    start_pod(&ctr, &pod, &[]);
    // The host's own `cat` (it runs on the host), made setuid root by the guest.
    let rootfs = ctr.bundle(&pod).join("rootfs");
    std::fs::copy("/bin/cat", rootfs.join("hostcat")).expect("copy cat");
    exec(
        &ctr,
        &pod,
        "suid",
        "chown 0:0 /hostcat && chmod 4755 /hostcat",
    );
    let in_share = pod_dir(&ctr, &pod)
        .join("share")
        .join(&pod)
        .join("rootfs/hostcat");
    let mode = std::fs::metadata(&in_share)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    let run = std::process::Command::new(&in_share)
        .arg("/proc/self/status")
        .uid(65534)
        .gid(65534)
        .output();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("{}/", pod_dir(&ctr, &pod).display())))
        .map(str::to_owned)
        .collect();
    remove(&ctr, &pod);
    assert_eq!(
        mode.ok().map(|m| m & 0o7777),
        Some(0o4755),
        "the guest made no setuid file"
    );
    if let Ok(out) = &run {
        let euid = text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().nth(1).map(str::to_owned));
        assert_ne!(
            euid.as_deref(),
            Some("0"),
            "a host user ran the guest's setuid file as root"
        );
    }
    assert!(!mounts.is_empty(), "no share mounts seen");
    for line in &mounts {
        let opts = line.split_whitespace().nth(5).unwrap_or_default();
        assert!(opts.contains("nosuid") && opts.contains("nodev"), "{line}");
    }
}

#[test]
fn test_hostile_shares_pod_planted_symlinks_redirect_nothing() {
    let test = "test_hostile_shares_pod_planted_symlinks_redirect_nothing";
    let Some(containerd) = containerd(test) else {
        return;
    };
    let ctr = containerd.ctr(Runtime::Husk, "hostile-ln");
    let sentinel = tempfile::Builder::new()
        .prefix("husk-sentinel-")
        .tempdir()
        .expect("sentinel");
    let target = sentinel.path().join("target");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(sentinel.path().join("keep"), "keep\n").expect("write");
    let data = sentinel.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("keep"), "keep\n").expect("write");
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );

    let pod = unique("lnpod");
    start_pod(&ctr, &pod, &["--cap-add", "CAP_SYS_ADMIN"]);
    let (app, next) = (unique("lnapp"), unique("lnnext"));
    let run_in_pod = |id: &str| {
        let mut flags = pod_flags(&pod, false);
        flags.extend(["--mount".to_owned(), bind.clone()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut all = vec!["-d"];
        all.extend_from_slice(&flags);
        ctr.run(&all, id, &["sleep", "1000"])
    };
    let started = run_in_pod(&app);
    assert!(started.status.success(), "{}", show(&started));
    let t = target.display();
    let plant = format!(
        "mkdir -p /tmp/p && mount -t virtiofs pod /tmp/p; S=/tmp/p; \
         ln -s {t} $S/{next}; \
         mv $S/{app}/binds $S/{app}/binds.old 2>/dev/null; ln -s {t} $S/{app}/binds 2>/dev/null; \
         ln -sfn {t} $S/{app}/binds/0 2>/dev/null; \
         mv $S/{app} $S/{app}.old 2>/dev/null; ln -s {t} $S/{app} 2>/dev/null; \
         ls -la $S; true"
    );
    let planted = exec(&ctr, &pod, "plant", &plant);
    // A create and a delete over the planted links.
    let created = run_in_pod(&next);
    remove(&ctr, &app);
    remove(&ctr, &next);
    let replant = format!("S=/tmp/p; ln -s {t} $S/{next} 2>/dev/null; ln -s {t} $S/{app}; true");
    exec(&ctr, &pod, "replant", &replant);
    let mounted_outside = procs::mounts_mentioning(&sentinel.path().to_string_lossy());
    remove(&ctr, &pod);
    println!(
        "{test}: planted: {planted}\ncreate over the plant: {}",
        show(&created)
    );
    assert_eq!(
        mounted_outside,
        Vec::<String>::new(),
        "mounts outside the share"
    );
    assert_eq!(
        listing(&target),
        Vec::<String>::new(),
        "made through a planted link"
    );
    assert_eq!(listing(sentinel.path()), ["data", "keep", "target"]);
    // The bind is read-write: the guest may add to it (a link of its own), not lose a file.
    let kept = std::fs::read_to_string(data.join("keep")).ok();
    assert_eq!(
        kept.as_deref(),
        Some("keep\n"),
        "the bind's host directory lost a file"
    );
    assert!(!pod_dir(&ctr, &pod).exists(), "the pod's directory is left");
}

#[test]
fn test_hostile_shares_sandbox_id_with_dot_dot_refused() {
    let test = "test_hostile_shares_sandbox_id_with_dot_dot_refused";
    let Some(containerd) = containerd(test) else {
        return;
    };
    let ctr = containerd.ctr(Runtime::Husk, "hostile-id");
    let escaped = Path::new(SHIM_RUN_ROOT).join("husk-e2e-escaped");
    let id = unique("badsb");
    let flags = [
        "--rm",
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=../husk-e2e-escaped",
    ];
    let out = ctr.run(&flags, &id, &["true"]);
    let made = escaped.exists();
    let _ = std::fs::remove_dir_all(&escaped);
    remove(&ctr, &id);
    assert!(
        !out.status.success(),
        "a sandbox id of ../x was taken: {}",
        show(&out)
    );
    assert!(
        text(&out.stderr).contains("io.kubernetes.cri.sandbox-id"),
        "{}",
        show(&out)
    );
    assert!(!made, "{} was made", escaped.display());
}
