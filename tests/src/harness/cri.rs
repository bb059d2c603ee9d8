//! A CRI client (the kubelet's side of the CRI gRPC API, `runtime.v1`) on a private
//! containerd's socket ([`Containerd::get_cri`](super::containerd::Containerd::get_cri)),
//! blocking: each call runs on a runtime of its own and must answer within [`CTR_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxContainerConfig, LinuxContainerResources, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::containerd::CTR_TIMEOUT;
use super::oci_image::IMAGE;

/// CRI's `ContainerState::ContainerExited`.
const CONTAINER_EXITED: i32 = 2;

/// A CRI client on containerd's socket, with the runtime that serves its calls.
#[derive(Debug)]
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    label: &'static str,
}

impl Cri {
    /// Connects to containerd's socket; `label` names the runtime in messages.
    ///
    /// # Panics
    /// When containerd does not answer.
    pub fn connect(socket: PathBuf, label: &'static str) -> Self {
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
    pub fn call<T>(
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

    /// `RunPodSandbox` of `config` with RuntimeClass handler `handler`; the sandbox id.
    ///
    /// # Panics
    /// When the call fails.
    pub fn run_pod(&mut self, config: &PodSandboxConfig, handler: &str) -> String {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        };
        self.call("RunPodSandbox", async |c| {
            c.run_pod_sandbox(request)
                .await
                .map(|r| r.into_inner().pod_sandbox_id)
        })
    }

    /// The pod's IP address, as CNI gave it (`PodSandboxStatus`).
    ///
    /// # Panics
    /// When the call fails.
    pub fn pod_ip(&mut self, pod: &str) -> String {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_owned(),
            verbose: false,
        };
        self.call("PodSandboxStatus", async |c| {
            c.pod_sandbox_status(request).await.map(|r| {
                r.into_inner()
                    .status
                    .and_then(|s| s.network)
                    .map(|n| n.ip)
                    .unwrap_or_default()
            })
        })
    }

    /// `CreateContainer` then `StartContainer` in pod `pod`; the container id.
    ///
    /// # Panics
    /// When a call fails.
    pub fn create_and_start(
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
    ///
    /// # Panics
    /// When the call fails or `cmd` exits non-zero.
    pub fn exec(&mut self, id: &str, cmd: &[&str]) -> String {
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
    ///
    /// # Panics
    /// When a call fails.
    pub fn exit(&mut self, id: &str) -> Option<(i32, String)> {
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

    /// `StopContainer` (1 s grace) and `RemoveContainer`.
    ///
    /// # Panics
    /// When a call fails.
    pub fn remove_container(&mut self, id: &str) {
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

    /// `StopPodSandbox` and `RemovePodSandbox`.
    ///
    /// # Panics
    /// When a call fails.
    pub fn remove_pod(&mut self, pod: &str) {
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

/// A pod `name` with that hostname, its container logs in `log_directory`.
pub fn pod_config(name: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "husk-test".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

/// A container of the busybox image running `command`, logging to `log` (relative to the
/// pod's log directory), with a memory limit unless `memory` is 0.
pub fn container(name: &str, command: &[&str], log: &str, memory: i64) -> ContainerConfig {
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
