//! The jailed VMM (issue 12, item 5): the host processes of a running container's VM (QEMU
//! and its serial relay here; husk-vmm in the emulated test host, see nested.rs) have no
//! capabilities, `no_new_privs`, a seccomp filter, their own mount, pid, ipc, uts and net
//! namespaces, and sit in the container's host cgroup (`linux.cgroupsPath`); a process in the
//! very jail the door built, and husk-vmm under its own filter, die of SIGSYS when they
//! `connect(2)` to a host socket, open an `AF_INET` socket, signal another pid or clone a new
//! user namespace.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_e2e::harness::procs::{self, Proc};
use husk_e2e::harness::{show, unique, Env, TestBundle};

/// The probes a guest that took a VMM over would try (`husk_vmm::confine::attempt`).
const FORBIDDEN: [&str; 6] = [
    "connect",
    "socket-inet",
    "tgkill-other",
    "clone-newuser",
    "chmod",
    "prctl-pdeathsig",
];
/// SIGSYS: what a seccomp filter's KILL_PROCESS delivers.
const SIGSYS: i32 = 31;

/// `/proc/<pid>/status` field `key`.
fn status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Every namespace a jailed process has of its own (runtime-tools' linux_ns_nopath checks
/// these of `state.pid`).
const NAMESPACES: [&str; 7] = ["mnt", "pid", "ipc", "uts", "net", "cgroup", "user"];

fn namespace(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|l| l.display().to_string())
        .unwrap_or_default()
}

/// What the test checks of one jailed process, as one comparable line per property.
fn confinement(p: &Proc, cgroup: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for key in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        seen.push(format!("{key} {}", status(p.pid, key)));
    }
    seen.push(format!("NoNewPrivs: {}", status(p.pid, "NoNewPrivs:")));
    seen.push(format!("Seccomp: {}", status(p.pid, "Seccomp:")));
    for kind in NAMESPACES {
        let own = namespace(&p.pid.to_string(), kind) != namespace("self", kind);
        seen.push(format!("own {kind} namespace: {own}"));
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap_or_default();
    let memory = cgroups
        .lines()
        .any(|l| (l.contains(":memory:") || l.starts_with("0::")) && l.ends_with(cgroup));
    seen.push(format!("in {cgroup}: {memory}"));
    seen
}

fn expected(cgroup: &str) -> Vec<String> {
    let mut want: Vec<String> = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .map(|k| format!("{k} 0000000000000000"))
        .collect();
    want.push("NoNewPrivs: 1".into());
    want.push("Seccomp: 2".into());
    for kind in NAMESPACES {
        want.push(format!("own {kind} namespace: true"));
    }
    want.push(format!("in {cgroup}: true"));
    want
}

/// Runs `probe` in a copy of the jail `spec` (the door's own spec file) and returns how it
/// ended: `exit N` or `signal N`.
fn probe_in_jail(spec: &Path, vmm: &Path, probe: &str, dir: &Path) -> String {
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec).expect("door's jail spec")).expect("json");
    let file_name = probe.replace(['/', ':'], "_");
    let root = dir.join(format!("{file_name}.root"));
    std::fs::create_dir_all(&root).expect("probe root");
    doc["root"] = root.display().to_string().into();
    doc["connect"] = serde_json::json!([]);
    doc["tap"] = serde_json::Value::Null;
    // A restored VM's memory is inherited from the door, which the probe is not.
    doc["inherited"] = 0.into();
    doc["cgroup_procs"] = serde_json::json!([]);
    doc["argv"] = serde_json::json!([vmm.display().to_string(), "probe-syscall", "none", probe]);
    if let Some(binds) = doc["binds"].as_array_mut() {
        binds.push(serde_json::json!({"path": vmm, "writable": false}));
    }
    let copy = dir.join(format!("{file_name}.json"));
    std::fs::write(&copy, doc.to_string()).expect("write spec");
    let out = Command::new(vmm)
        .args(["jail", "--spec"])
        .arg(&copy)
        .output()
        .expect("husk-vmm jail");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match out.status.code() {
        Some(code) if code > 128 => format!("signal {}", code - 128),
        Some(code) if said.is_empty() => format!("exit {code}"),
        Some(code) => format!("exit {code} ({said})"),
        None => format!("signal {}", out.status.signal().unwrap_or(0)),
    }
}

/// How `husk-vmm probe-syscall vmm NAME` (husk-vmm's own allowlist) ends.
fn probe_vmm_filter(vmm: &Path, probe: &str) -> String {
    let out = Command::new(vmm)
        .args(["probe-syscall", "vmm", probe])
        .output()
        .expect("husk-vmm probe-syscall");
    match (out.status.code(), out.status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => show(&out),
    }
}

/// The host cgroup's CPU shares (v1 `cpu.shares`; v2 `cpu.weight` mapped back to 2048 when
/// it is runc's weight for 2048) and `cpuset.cpus`.
fn host_cpu_settings(cgroup: &str) -> (String, String) {
    let read = |path: PathBuf| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let rel = cgroup.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.exists() {
        let shares = read(v1.join(rel).join("cpu.shares"));
        let cpus = read(
            Path::new("/sys/fs/cgroup/cpuset")
                .join(rel)
                .join("cpuset.cpus"),
        );
        return (shares, cpus);
    }
    let dir = Path::new("/sys/fs/cgroup").join(rel);
    let weight = read(dir.join("cpu.weight"));
    let shares = if weight == "79" {
        "2048".to_owned()
    } else {
        weight
    };
    (shares, read(dir.join("cpuset.cpus")))
}

/// The process named `name` whose command line mentions `needle`, waited for.
fn wait_for(name: &str, role: Option<&str>, needle: &str) -> Option<Proc> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let found = procs::all().into_iter().find(|p| {
            p.name == name
                && p.mentions(needle)
                && role.is_none_or(|r| p.argv.get(1).is_some_and(|a| a == r))
        });
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The shared memory (`shmem` of `memory.stat`, cgroup v1 or v2) charged to `cgroup`.
fn shmem_bytes(cgroup: &str) -> u64 {
    let rel = cgroup.trim_start_matches('/');
    ["memory", ""]
        .iter()
        .map(|h| {
            Path::new("/sys/fs/cgroup")
                .join(h)
                .join(rel)
                .join("memory.stat")
        })
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("shmem ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn test_vm_host_processes_jailed_in_container_cgroup_and_die_of_sigsys() {
    let Some(env) = Env::get("test_vm_host_processes_jailed_in_container_cgroup_and_die_of_sigsys")
    else {
        return;
    };
    let husk = env.husk();
    let vmm = env.husk.with_file_name("husk-vmm");
    let id = unique("jail");
    let cgroup = format!("/husk-e2e/{id}");
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo up; sleep 60"]);
    bundle.edit(|c| {
        c["linux"]["cgroupsPath"] = cgroup.clone().into();
        // Placement and shares apply to the VM's host processes (runtime-tools reads them there).
        c["linux"]["resources"]["cpu"] = serde_json::json!({"shares": 2048, "cpus": "0"});
    });
    let mut run = husk.spawn_run(&bundle, &id, &[]);
    drop(run.stdin.take());

    // Their command lines name the VM's directory (its sockets), not the container.
    let vm_dir = husk_sandbox::vm_dir(&husk.root().join(&id));
    let vm_dir = vm_dir.to_str().expect("utf-8");
    let qemu = wait_for("qemu-system-x86_64", None, vm_dir).expect("QEMU of the container");
    let relay = wait_for("husk-vmm", Some("serial-relay"), vm_dir).expect("its serial relay");
    // The container runs once it printed (a kill before then would find it being created).
    let mut up = String::new();
    let stdout = run.stdout.take().expect("stdout");
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut up);
    assert_eq!(up.trim(), "up", "the container never started");
    // The container's pid as the host sees it is QEMU, the jail's pid 1.
    // `run` records the pid once `start` returned, a moment after the first output.
    let state_of = || -> serde_json::Value {
        let out = husk.command(&["state", &id]).output().expect("husk state");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut state = state_of();
    while state["status"] != "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        state = state_of();
    }
    assert_eq!(
        state["pid"], qemu.pid,
        "state.pid is not the jailed VMM: {state}"
    );
    let host_cpu = host_cpu_settings(&cgroup);
    let guest_ram = shmem_bytes(&cgroup);
    let seen_qemu = confinement(&qemu, &cgroup);
    let seen_relay = confinement(&relay, &cgroup);
    let spec = husk.root().join(&id).join("qemu-system-x86_64.jail.json");
    let dir = tempfile::tempdir().expect("tempdir");
    let in_jail: Vec<String> = FORBIDDEN
        .iter()
        .chain(&["getpid"])
        .map(|p| format!("{p}: {}", probe_in_jail(&spec, &vmm, p, dir.path())))
        .collect();
    // uid 0 in the jail: /proc holds processes only, read-only (no /proc/sys to write).
    let proc_sys = probe_in_jail(&spec, &vmm, "proc-sys", dir.path());
    // The container's state (state.json, the jail specs) is not in the jail.
    let state = husk.root().join(&id).join("state.json");
    let state_on_host = state.exists();
    let state_in_jail = probe_in_jail(
        &spec,
        &vmm,
        &format!("exists:{}", state.display()),
        dir.path(),
    );
    let vmm_filter: Vec<String> = FORBIDDEN
        .iter()
        .chain(&["getpid"])
        .map(|p| format!("{p}: {}", probe_vmm_filter(&vmm, p)))
        .collect();

    let _ = husk.command(&["kill", &id, "KILL"]).output();
    let _ = run.wait();
    let _ = husk.command(&["delete", "--force", &id]).output();
    let leftover: Vec<PathBuf> = ["memory", "pids", "cpu", "unified"]
        .iter()
        .map(|h| {
            Path::new("/sys/fs/cgroup")
                .join(h)
                .join(cgroup.trim_start_matches('/'))
        })
        .chain([Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'))])
        .filter(|p| p.exists())
        .collect();

    assert_eq!(
        host_cpu,
        ("2048".to_owned(), "0".to_owned()),
        "host cgroup cpu.shares (or the weight of 2048 on v2) and cpuset.cpus"
    );
    // Guest RAM is a memfd: shared memory. A restored VM's copy of its snapshot's memory
    // (about 20 MiB) is made in the container's cgroup too, not in the runtime's (which left
    // the cgroup about 0.3 MiB, what the guest wrote since).
    assert!(
        guest_ram >= 8 << 20,
        "the container's host cgroup holds {guest_ram} bytes of guest RAM"
    );
    assert_eq!(seen_qemu, expected(&cgroup), "QEMU's confinement");
    assert_eq!(
        seen_relay,
        expected(&cgroup),
        "the serial relay's confinement"
    );
    let sigsys = |probes: Vec<String>| {
        let mut want: Vec<String> = FORBIDDEN
            .iter()
            .map(|p| format!("{p}: signal {SIGSYS}"))
            .collect();
        let pid_line = probes.last().cloned().unwrap_or_default();
        assert!(pid_line.starts_with("getpid: exit 0"), "{pid_line}");
        want.push(pid_line);
        assert_eq!(probes, want);
    };
    sigsys(in_jail);
    sigsys(vmm_filter);
    assert_eq!(proc_sys, "exit 0 (proc-sys: returned -1)");
    assert!(state_on_host, "no {}", state.display());
    assert!(
        state_in_jail.ends_with("returned -1)"),
        "the jail sees the container's state: {state_in_jail}"
    );
    assert!(leftover.is_empty(), "host cgroup left behind: {leftover:?}");
}
