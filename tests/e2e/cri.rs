//! containerd-shim-husk-v2 under containerd's CRI plugin, driven through the CRI gRPC API as a
//! kubelet drives it (RuntimeClass handler `runc`, the oracle, then `husk`): a pod sandbox
//! with the pod network CRI makes through CNI (loopback only), two containers in it, exec,
//! container logs, an OOM-killed container's `OOMKilled` reason, stop and removal, and
//! nothing left behind (processes, mounts, the pod's network namespace). Without `$HUSK_OUT/bin/containerd-shim-husk-v2` the husk half prints
//! `SKIPPED: <reason>`.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime, CTR_TIMEOUT};
use husk_e2e::harness::oci_image::IMAGE;
use husk_e2e::harness::procs::{self, Proc};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxContainerConfig, LinuxContainerResources, PodSandboxConfig,
    PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// CRI's `ContainerState::ContainerExited`.
const CONTAINER_EXITED: i32 = 2;

/// A CRI client on containerd's socket, with the runtime that serves its calls.
struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    label: &'static str,
}

impl Cri {
    fn connect(socket: PathBuf, label: &'static str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = runtime
            .block_on(
                Endpoint::from_static("http://localhost").connect_with_connector(
                    tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }),
                ),
            )
            .expect("connect to containerd's CRI");
        Self {
            runtime,
            client: RuntimeServiceClient::new(channel),
            label,
        }
    }

    /// Runs one call to its end, in at most [`CTR_TIMEOUT`].
    ///
    /// # Panics
    /// When the call fails or takes longer.
    fn call<T>(
        &mut self,
        what: &str,
        call: impl AsyncFnOnce(&mut RuntimeServiceClient<Channel>) -> Result<T, tonic::Status>,
    ) -> T {
        let client = &mut self.client;
        let label = self.label;
        match self
            .runtime
            .block_on(async { tokio::time::timeout(CTR_TIMEOUT, call(client)).await })
        {
            Ok(Ok(reply)) => reply,
            Ok(Err(status)) => panic!("{label}: CRI {what}: {status}"),
            Err(_) => panic!("{label}: CRI {what}: no answer in {CTR_TIMEOUT:?}"),
        }
    }

    fn create_and_start(
        &mut self,
        pod: &str,
        sandbox: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> String {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let id = self.call(&format!("CreateContainer {name:?}"), async |c| {
            c.create_container(request)
                .await
                .map(|r| r.into_inner().container_id)
        });
        let request = StartContainerRequest {
            container_id: id.clone(),
        };
        self.call(&format!("StartContainer {name:?}"), async |c| {
            c.start_container(request).await.map(drop)
        });
        id
    }

    /// stdout of `cmd` run in container `id` (it must exit 0).
    fn exec(&mut self, id: &str, cmd: &[&str]) -> String {
        let request = ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 30,
        };
        let reply = self.call(&format!("ExecSync {cmd:?}"), async |c| {
            c.exec_sync(request).await.map(tonic::Response::into_inner)
        });
        assert_eq!(
            reply.exit_code,
            0,
            "{}: exec {cmd:?}: stderr {:?}",
            self.label,
            String::from_utf8_lossy(&reply.stderr)
        );
        String::from_utf8_lossy(&reply.stdout).trim().to_owned()
    }

    /// (exit code, reason) once container `id` has exited (within [`CTR_TIMEOUT`]).
    fn exit(&mut self, id: &str) -> Option<(i32, String)> {
        let deadline = Instant::now() + CTR_TIMEOUT;
        while Instant::now() < deadline {
            let request = ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            };
            let status = self.call("ContainerStatus", async |c| {
                c.container_status(request)
                    .await
                    .map(|r| r.into_inner().status)
            });
            if let Some(s) = status.filter(|s| s.state == CONTAINER_EXITED) {
                return Some((s.exit_code, s.reason));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn remove_container(&mut self, id: &str) {
        let stop = StopContainerRequest {
            container_id: id.to_owned(),
            timeout: 1,
        };
        self.call("StopContainer", async |c| {
            c.stop_container(stop).await.map(drop)
        });
        let remove = RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.call("RemoveContainer", async |c| {
            c.remove_container(remove).await.map(drop)
        });
    }

    fn remove_pod(&mut self, pod: &str) {
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: pod.to_owned(),
        };
        self.call("StopPodSandbox", async |c| {
            c.stop_pod_sandbox(stop).await.map(drop)
        });
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_owned(),
        };
        self.call("RemovePodSandbox", async |c| {
            c.remove_pod_sandbox(remove).await.map(drop)
        });
    }
}

/// A container of the busybox image running `command`, logging to `log` (relative to the
/// pod's log directory).
fn container(name: &str, command: &[&str], log: &str, memory: i64) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.to_owned(),
            ..Default::default()
        }),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        log_path: log.to_owned(),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: memory,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

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
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("pod-{label}"),
            uid: format!("uid-{label}"),
            namespace: "husk-test".to_owned(),
            attempt: 0,
        }),
        hostname: format!("pod-{label}"),
        log_directory: logs.path().to_string_lossy().into_owned(),
        ..Default::default()
    };
    let request = RunPodSandboxRequest {
        config: Some(sandbox.clone()),
        runtime_handler: label.to_owned(),
    };
    let pod = cri.call("RunPodSandbox", async |c| {
        c.run_pod_sandbox(request)
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    });
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
