//! containerd-shim-husk-v2 under containerd's CRI plugin, driven through the CRI gRPC API as a
//! kubelet drives it (RuntimeClass handler `runc`, the oracle, then `husk`): a pod sandbox
//! with the pod network CRI makes through CNI (loopback only), two containers in it, exec,
//! container logs, an OOM-killed container's `OOMKilled` reason, stop and removal, and
//! nothing left behind (processes, mounts, the pod's network namespace). Without `$HUSK_OUT/bin/containerd-shim-husk-v2` the husk half prints
//! `SKIPPED: <reason>`.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;
use std::time::{Duration, Instant};

use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime, CTR_TIMEOUT};
use husk_e2e::harness::cri::{container, pod_config, Cri};
use husk_e2e::harness::procs::{self, Proc};

#[derive(Debug, PartialEq)]
struct PodRun {
    /// The pod's hostname, as a container reads it.
    hostname: String,
    /// The two containers see the same network namespace and kernel (boot id).
    same_netns: bool,
    same_boot_id: bool,
    /// The pod's network namespace is not the host's (CRI made one through CNI).
    own_netns: bool,
    /// The first container's log (CRI's format: time, stream, tag, line) holds its line.
    logged: bool,
    /// Exit code and reason of a container killed by the OOM killer.
    oom: Option<(i32, String)>,
    /// Shims and VMMs of the pod while it ran.
    shims: usize,
    vmms: usize,
    /// What is left of the pod after its removal: shims, VMMs, mounts naming it.
    left: Vec<String>,
}

fn pod_run(containerd: &Containerd, runtime: Runtime) -> PodRun {
    let label = runtime.label();
    let mut cri = Cri::connect(containerd.socket(), label);
    let netns_before = network_namespaces();
    let logs = tempfile::tempdir().expect("log dir");
    let sandbox = pod_config(&format!("pod-{label}"), logs.path());
    let pod = cri.run_pod(&sandbox, label);
    let app = cri.create_and_start(
        &pod,
        &sandbox,
        container(
            "app",
            &["sh", "-c", "echo hello from the pod; exec sleep 1000"],
            "app.log",
            0,
        ),
    );
    let side = cri.create_and_start(
        &pod,
        &sandbox,
        container("side", &["sleep", "1000"], "side.log", 0),
    );
    let probe = [
        "sh",
        "-c",
        "readlink /proc/self/ns/net; cat /proc/sys/kernel/random/boot_id",
    ];
    let (app_seen, side_seen) = (cri.exec(&app, &probe), cri.exec(&side, &probe));
    let app_netns = app_seen.lines().next().unwrap_or_default().to_owned();
    let host_netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hostname = cri.exec(&app, &["hostname"]);
    let logged = wait_for_line(&logs.path().join("app.log"), "hello from the pod");

    let cri_ctr = containerd.cri_ctr();
    let shims = cri_ctr.shims();
    let spawned = shims
        .iter()
        .flat_map(|s| procs::descendants(s.pid))
        .filter(Proc::is_vmm_or_helper)
        .collect::<Vec<_>>();

    let oom = cri.create_and_start(
        &pod,
        &sandbox,
        container("oom", &["tail", "/dev/zero"], "oom.log", 32 << 20),
    );
    let oom_exit = cri.exit(&oom);

    for id in [&app, &side, &oom] {
        cri.remove_container(id);
    }
    cri.remove_pod(&pod);
    PodRun {
        hostname,
        same_netns: app_netns == side_seen.lines().next().unwrap_or_default(),
        same_boot_id: app_seen.lines().nth(1) == side_seen.lines().nth(1),
        own_netns: !app_netns.is_empty() && app_netns != host_netns,
        logged,
        oom: oom_exit,
        shims: shims.len(),
        vmms: spawned.iter().filter(|p| p.is_vmm()).count(),
        left: leftovers(&cri_ctr, &pod, &shims, &spawned, &netns_before),
    }
}

/// Whether `path` gets a line containing `needle` within [`CTR_TIMEOUT`].
fn wait_for_line(path: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + CTR_TIMEOUT;
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.lines().any(|l| l.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The network namespaces CRI keeps (one per pod, made before CNI runs).
fn network_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("/var/run/netns/{}", e.file_name().to_string_lossy()))
        .collect()
}

/// Polls for up to 30 s until none of `shims` and what they `spawned` runs, CRI's namespace
/// has no shim, no mount names `pod` and no network namespace beyond `netns_before` is
/// left; returns what is still there.
fn leftovers(
    ctr: &Ctr<'_>,
    pod: &str,
    shims: &[Proc],
    spawned: &[Proc],
    netns_before: &[String],
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut left: Vec<String> = shims
            .iter()
            .chain(spawned)
            .filter(|p| p.alive())
            .map(|p| format!("{} {}", p.pid, p.name))
            .collect();
        left.extend(
            ctr.shims()
                .into_iter()
                .map(|p| format!("{} {}", p.pid, p.name)),
        );
        left.extend(procs::mounts_mentioning(pod));
        left.extend(
            network_namespaces()
                .into_iter()
                .filter(|n| !netns_before.contains(n)),
        );
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_cri_pod_lifecycle_oom_reason_and_cleanup_same_as_runc() {
    let test = "test_cri_pod_lifecycle_oom_reason_and_cleanup_same_as_runc";
    let Some(containerd) = Containerd::get_cri(test) else {
        return;
    };
    for runtime in [Runtime::Runc, Runtime::Husk] {
        if let Some(reason) = runtime.missing() {
            println!("SKIPPED: {test} ({} half): {reason}", runtime.label());
            continue;
        }
        let seen = pod_run(&containerd, runtime);
        println!("{test}: {}: {seen:?}", runtime.label());
        let expected = PodRun {
            hostname: format!("pod-{}", runtime.label()),
            same_netns: true,
            same_boot_id: true,
            own_netns: true,
            logged: true,
            oom: Some((137, "OOMKilled".to_owned())),
            shims: 1,
            vmms: usize::from(runtime == Runtime::Husk),
            left: Vec::new(),
        };
        assert_eq!(
            seen,
            expected,
            "{test}: {} (left, seen) differs from what runc.v2 gives (right)",
            runtime.label()
        );
    }
}
