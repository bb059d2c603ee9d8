//! containerd-shim-husk-v2 under containerd's CRI plugin, driven through the CRI gRPC API as a
//! kubelet drives it (RuntimeClass handler `runc`, the oracle, then `husk`): a pod sandbox
//! with the pod network CRI makes through CNI (`ptp`), containers in it sharing its network
//! namespace and kernel, exec, the pod's IP on their interface and a server in the pod reached
//! from the host at it, container logs, an OOM-killed container's `OOMKilled` reason, stop
//! and removal, and nothing left behind (processes, mounts, the pod's network namespace).
//! Without `$HUSK_OUT/bin/containerd-shim-husk-v2` the husk half prints `SKIPPED: <reason>`.

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
    /// The container sees the pod's IP (CNI's) on its interface.
    pod_ip_on_interface: bool,
    /// What a server in the pod answered the host at the pod's IP.
    reply_from_pod_ip: String,
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
    // The pod's network: CNI's address on the container's interface, and a server in the pod
    // reached from the host at that address.
    let pod_ip = cri.pod_ip(&pod);
    let addresses = cri.exec(&app, &["ip", "-4", "-o", "address", "show"]);
    let web = cri.create_and_start(
        &pod,
        &sandbox,
        container(
            "web",
            &[
                "sh",
                "-c",
                "while true; do echo hi from the pod | nc -l -p 8080; done",
            ],
            "web.log",
            0,
        ),
    );
    let reply = fetch(&pod_ip, 8080);
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

    for id in [&app, &side, &web, &oom] {
        cri.remove_container(id);
    }
    cri.remove_pod(&pod);
    PodRun {
        hostname,
        same_netns: app_netns == side_seen.lines().next().unwrap_or_default(),
        same_boot_id: app_seen.lines().nth(1) == side_seen.lines().nth(1),
        own_netns: !app_netns.is_empty() && app_netns != host_netns,
        pod_ip_on_interface: !pod_ip.is_empty() && addresses.contains(&format!("{pod_ip}/")),
        reply_from_pod_ip: reply,
        logged,
        oom: oom_exit,
        shims: shims.len(),
        vmms: spawned.iter().filter(|p| p.is_vmm()).count(),
        left: leftovers(&cri_ctr, &pod, &shims, &spawned, &netns_before),
    }
}

/// The first line a TCP server at `ip:port` sends, trying for up to [`CTR_TIMEOUT`] (the
/// server may not listen yet); what went wrong last otherwise.
fn fetch(ip: &str, port: u16) -> String {
    use std::io::Read;
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return format!("no pod IP: {ip:?}");
    };
    let address = std::net::SocketAddr::new(ip, port);
    let deadline = Instant::now() + CTR_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok(reply)
            });
        match attempt {
            Ok(reply) if !reply.is_empty() => return reply.trim().to_owned(),
            Ok(_) => last = "empty reply".to_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    format!("{address}: {last}")
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
            pod_ip_on_interface: true,
            reply_from_pod_ip: "hi from the pod".to_owned(),
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
