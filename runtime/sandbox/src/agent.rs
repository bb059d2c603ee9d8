//! Client of husk-agent over the VM's hybrid vsock (see guest-agent/protocol/README.md).
//!
//! A connection is a Unix stream to the VM's vsock socket on which we write `CONNECT <port>\n`
//! and read `OK <port>\n`; the guest refusing (agent not listening yet) closes the stream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocol::{
    read_message, write_message, ContainerSpec, Network, ProcessInfo, ProcessSpec, Request,
    Resources, Response, Stats, StdioStream,
};
use husk_protocol::{AGENT_PORT, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::SandboxError;

/// Longest `OK <port>\n` line accepted from the vsock device.
const MAX_OK_LINE: usize = 32;
/// How long one connection attempt may wait for the device's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts while the guest boots.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Opens a hybrid-vsock connection to `port` in the guest.
///
/// # Errors
/// I/O errors; [`std::io::ErrorKind::ConnectionRefused`] when the guest refused the port.
pub async fn connect_vsock(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(MAX_OK_LINE);
    while line.len() < MAX_OK_LINE {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(std::io::ErrorKind::ConnectionRefused.into())
            }
            Err(e) => return Err(e),
        };
        if byte == b'\n' {
            return match line.starts_with(b"OK ") {
                true => Ok(stream),
                false => Err(std::io::Error::other("vsock device answered without OK")),
            };
        }
        line.push(byte);
    }
    Err(std::io::Error::other("vsock device answer too long"))
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, 128+N when killed by signal N.
    pub code: i32,
    /// The OOM killer killed a process of the container (its memory limit was reached).
    pub oom_killed: bool,
}

/// The stdio streams of one process in the guest ([`AgentClient::attach_streams`]).
#[derive(Debug)]
pub struct ProcessStreams {
    /// To the process's stdin; shutting its write side down closes the process's stdin.
    pub stdin: UnixStream,
    /// From its stdout (its terminal, with one); ends with the process's output.
    pub stdout: UnixStream,
    /// From its stderr; none with a terminal.
    pub stderr: Option<UnixStream>,
}

/// A control connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    uds: PathBuf,
    stream: UnixStream,
}

impl AgentClient {
    /// Connects and shakes hands, retrying while the guest boots, until `deadline`.
    ///
    /// # Errors
    /// [`SandboxError::VersionMismatch`], or the last connection error at the deadline.
    pub async fn connect(uds: &Path, deadline: Instant) -> Result<Self, SandboxError> {
        loop {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, connect_vsock(uds, AGENT_PORT)).await {
                Ok(Ok(stream)) => return Self::handshake(uds, stream).await,
                Ok(Err(e)) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) if Instant::now() >= deadline => {
                    return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
                }
                _ => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }

    /// Opens another control connection to the same agent (the agent is known to be up).
    ///
    /// # Errors
    /// As [`AgentClient::connect`].
    pub async fn reconnect(&self) -> Result<Self, SandboxError> {
        let stream = connect_vsock(&self.uds, AGENT_PORT).await?;
        Self::handshake(&self.uds, stream).await
    }

    async fn handshake(uds: &Path, stream: UnixStream) -> Result<Self, SandboxError> {
        let mut client = Self {
            uds: uds.to_owned(),
            stream,
        };
        match client
            .request(&Request::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?
        {
            Response::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(client),
            Response::Hello { version, .. } => Err(SandboxError::VersionMismatch {
                host: PROTOCOL_VERSION,
                agent: version,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn request(&mut self, req: &Request) -> Result<Response, SandboxError> {
        write_message(&mut self.stream, req).await?;
        match read_message(&mut self.stream).await? {
            Some(Response::Error { kind, message }) => Err(SandboxError::Agent { kind, message }),
            Some(resp) => Ok(resp),
            None => Err(SandboxError::Protocol("agent closed the connection".into())),
        }
    }

    async fn request_ok(&mut self, req: &Request) -> Result<(), SandboxError> {
        match self.request(req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Builds the container; its process waits for [`AgentClient::start`].
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn create(&mut self, spec: &ContainerSpec) -> Result<(), SandboxError> {
        self.request_ok(&Request::CreateContainer {
            spec: Box::new(spec.clone()),
        })
        .await
    }

    /// Starts the container's process; returns its pid in the guest.
    ///
    /// # Errors
    /// The agent's refusal (e.g. exec failed) or a transport error.
    pub async fn start(&mut self, id: &str) -> Result<u32, SandboxError> {
        match self
            .request(&Request::StartContainer { id: id.to_owned() })
            .await?
        {
            Response::Started { pid } => Ok(pid),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits for the process to exit and its output to be delivered; returns how it ended.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn wait(&mut self, id: &str) -> Result<ExitStatus, SandboxError> {
        match self
            .request(&Request::WaitContainer { id: id.to_owned() })
            .await?
        {
            Response::Exited { code, oom_killed } => Ok(ExitStatus { code, oom_killed }),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `signal` to the container's process.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn signal(&mut self, id: &str, signal: i32) -> Result<(), SandboxError> {
        self.signal_all(id, signal, false).await
    }

    /// Sends `signal` to the container's process, or with `all` to all of its processes.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn signal_all(
        &mut self,
        id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), SandboxError> {
        self.request_ok(&Request::SignalContainer {
            id: id.to_owned(),
            signal,
            all,
        })
        .await
    }

    /// Starts `process` in the running container; returns its pid in the guest.
    ///
    /// # Errors
    /// The agent's refusal (`exec_failed` with the reason) or a transport error.
    pub async fn exec(
        &mut self,
        id: &str,
        exec_id: &str,
        process: &ProcessSpec,
        detach: bool,
    ) -> Result<u32, SandboxError> {
        let request = Request::ExecProcess {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            process: process.clone(),
            detach,
        };
        match self.request(&request).await? {
            Response::Started { pid } => Ok(pid),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits for an exec process's exit code (after its output was delivered).
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn wait_process(&mut self, id: &str, exec_id: &str) -> Result<i32, SandboxError> {
        let request = Request::WaitProcess {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        match self.request(&request).await? {
            Response::Exited { code, .. } => Ok(code),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `signal` to an exec process.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn signal_process(
        &mut self,
        id: &str,
        exec_id: &str,
        signal: i32,
    ) -> Result<(), SandboxError> {
        self.request_ok(&Request::SignalProcess {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
        })
        .await
    }

    /// The VM's vsock socket this client talks through.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// Sets the window size of the container's (or an exec's) terminal.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn resize(
        &mut self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), SandboxError> {
        self.request_ok(&Request::ResizeTerminal {
            id: id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            rows,
            cols,
        })
        .await
    }

    /// Freezes (`pause`) or thaws the container.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn pause(&mut self, id: &str, pause: bool) -> Result<(), SandboxError> {
        let id = id.to_owned();
        self.request_ok(&match pause {
            true => Request::PauseContainer { id },
            false => Request::ResumeContainer { id },
        })
        .await
    }

    /// Changes the container's cgroup limits.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn update(&mut self, id: &str, resources: &Resources) -> Result<(), SandboxError> {
        self.request_ok(&Request::UpdateContainer {
            id: id.to_owned(),
            resources: resources.clone(),
        })
        .await
    }

    /// Gives the VM's network device the pod's network.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn configure_network(&mut self, network: &Network) -> Result<(), SandboxError> {
        self.request_ok(&Request::ConfigureNetwork {
            network: network.clone(),
        })
        .await
    }

    /// Forgets a container that exited and was waited for: its id is free again in the VM.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn delete(&mut self, id: &str) -> Result<(), SandboxError> {
        self.request_ok(&Request::DeleteContainer { id: id.to_owned() })
            .await
    }

    /// The container's cgroup counters.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn stats(&mut self, id: &str) -> Result<Stats, SandboxError> {
        match self
            .request(&Request::ContainerStats { id: id.to_owned() })
            .await?
        {
            Response::Stats { stats } => Ok(stats),
            other => Err(unexpected(&other)),
        }
    }

    /// The container's processes.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn processes(&mut self, id: &str) -> Result<Vec<ProcessInfo>, SandboxError> {
        match self
            .request(&Request::ListProcesses { id: id.to_owned() })
            .await?
        {
            Response::Processes { processes } => Ok(processes),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the agent to power the VM off. The connection closes on return, which tells the
    /// agent its acknowledgement arrived and it may power off.
    ///
    /// # Errors
    /// A transport error.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.request_ok(&Request::Shutdown).await
    }

    /// Opens the connection carrying one stdio stream of container `id`.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn attach(&self, id: &str, stream: StdioStream) -> Result<UnixStream, SandboxError> {
        self.attach_process(id, None, stream).await
    }

    /// Every stdio stream of the container's process or (`exec_id`) an exec process: stdin,
    /// stdout and, without a `terminal`, stderr (a terminal's output is all on stdout).
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn attach_streams(
        &self,
        id: &str,
        exec_id: Option<&str>,
        terminal: bool,
    ) -> Result<ProcessStreams, SandboxError> {
        let stdin = self.attach_process(id, exec_id, StdioStream::Stdin).await?;
        let stdout = self
            .attach_process(id, exec_id, StdioStream::Stdout)
            .await?;
        let stderr = match terminal {
            true => None,
            false => Some(
                self.attach_process(id, exec_id, StdioStream::Stderr)
                    .await?,
            ),
        };
        Ok(ProcessStreams {
            stdin,
            stdout,
            stderr,
        })
    }

    /// [`AgentClient::attach`] for the container's process or (`exec_id`) an exec process.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn attach_process(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
    ) -> Result<UnixStream, SandboxError> {
        let mut conn = connect_vsock(&self.uds, AGENT_PORT).await?;
        write_message(
            &mut conn,
            &Request::AttachStdio {
                id: id.to_owned(),
                stream,
                exec_id: exec_id.map(str::to_owned),
            },
        )
        .await?;
        match read_message(&mut conn).await? {
            Some(Response::Ok) => Ok(conn),
            Some(Response::Error { kind, message }) => Err(SandboxError::Agent { kind, message }),
            Some(other) => Err(unexpected(&other)),
            None => Err(SandboxError::Protocol(
                "agent closed the stdio connection".into(),
            )),
        }
    }
}

fn unexpected(resp: &Response) -> SandboxError {
    SandboxError::Protocol(format!("unexpected reply {resp:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake vsock device: answers CONNECT with `answer` and then runs `then` on the stream.
    async fn fake_device(listener: UnixListener, answer: &'static [u8]) -> UnixStream {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 13];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"CONNECT 1024\n");
        s.write_all(answer).await.unwrap();
        s
    }

    #[tokio::test]
    async fn test_connect_vsock_ok_line_returns_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(fake_device(listener, b"OK 1073741824\nX"));
        let mut s = connect_vsock(&path, AGENT_PORT).await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), b'X');
        dev.await.unwrap();
    }

    #[tokio::test]
    async fn test_connect_vsock_closed_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(async move { drop(fake_device(listener, b"").await) });
        let err = connect_vsock(&path, AGENT_PORT).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        dev.await.unwrap();
    }

    #[tokio::test]
    async fn test_handshake_other_version_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(async move {
            let mut s = fake_device(listener, b"OK 5\n").await;
            let _: Option<Request> = read_message(&mut s).await.unwrap();
            write_message(
                &mut s,
                &Response::Hello {
                    version: 99,
                    agent: "x".into(),
                },
            )
            .await
            .unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = AgentClient::connect(&path, deadline).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::VersionMismatch { agent: 99, .. }),
            "{err}"
        );
        dev.await.unwrap();
    }
}
