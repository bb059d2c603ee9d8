//! Client of husk-agent over the VM's hybrid vsock (see guest-agent/protocol/README.md).
//!
//! A connection is a Unix stream to the VM's vsock socket on which we write `CONNECT <port>\n`
//! and read `OK <port>\n`; the guest refusing (agent not listening yet) closes the stream.
//!
//! The guest is hostile (README, "Security model"): every wait on it has a deadline and every
//! string it sends is cleaned before the host shows or logs it.
//! - Deadlines: the `CONNECT` answer ([`CONNECT_TIMEOUT`]) and each request, by kind
//!   ([`deadline`]): a request that misses its deadline fails with
//!   [`SandboxError::AgentTimeout`] and leaves the connection unusable (a late answer would
//!   pair with the next request). Only the waits for a process's exit have none: they may last
//!   as long as the container, each holds a connection of its own and no lock, and its caller
//!   also watches the VM's end.
//! - Strings: [`sanitize`] turns every string of a response (error messages, command lines,
//!   the agent's name) and every decoding error into one printable, capped line, here, where
//!   the guest's bytes become host strings.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocol::{
    read_message, write_message, ContainerSpec, GuestIdentity, Network, ProcessInfo, ProcessSpec,
    Request, Resources, Response, Stats, StdioStream,
};
use husk_protocol::{AGENT_PORT, PROTOCOL_VERSION};
use tokio::net::UnixStream;

use crate::SandboxError;
use husk_hypervisor::connect_vsock;

/// How long one connection attempt may wait for the device's answer while the guest boots.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts while the guest boots.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// How long the vsock device may take to answer `CONNECT` once the guest is up: the guest
/// kernel completes the connection for a listening agent without the agent's help, so this
/// bounds a guest kernel that holds the connection half-open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests the agent answers from memory or with a few syscalls and cgroup files (hello,
/// signal, delete, stats, processes, pause, resume, update, resize, shutdown, stdio attach).
/// Milliseconds on an idle guest; generous for a TCG guest on a loaded host.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Start and exec: the agent forks, enters the container and executes its program, loaded
/// over virtio-fs.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Create and the pod network: the guest mounts the rootfs and binds over virtio-fs, makes
/// namespaces, cgroups and devices, runs the setup up to the process's wait (seconds under
/// TCG, more with many mounts on a loaded host), or configures links with rtnetlink.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest guest string shown or logged, in bytes, before the truncation marker.
pub const MAX_GUEST_TEXT: usize = 512;

/// The request's name (for [`SandboxError::AgentTimeout`]) and deadline; `None` for the waits
/// for an exit, which last as long as the process does.
pub fn deadline(req: &Request) -> (&'static str, Option<Duration>) {
    match req {
        Request::Hello { .. } => ("hello", Some(SHORT_TIMEOUT)),
        Request::SetIdentity { .. } => ("set identity", Some(SHORT_TIMEOUT)),
        Request::CreateContainer { .. } => ("create", Some(CREATE_TIMEOUT)),
        Request::ConfigureNetwork { .. } => ("configure network", Some(CREATE_TIMEOUT)),
        Request::StartContainer { .. } => ("start", Some(START_TIMEOUT)),
        Request::ExecProcess { .. } => ("exec", Some(START_TIMEOUT)),
        Request::WaitContainer { .. } => ("wait", None),
        Request::WaitProcess { .. } => ("wait process", None),
        Request::SignalContainer { .. } => ("signal", Some(SHORT_TIMEOUT)),
        Request::SignalProcess { .. } => ("signal process", Some(SHORT_TIMEOUT)),
        Request::AttachStdio { .. } => ("attach stdio", Some(SHORT_TIMEOUT)),
        Request::PauseContainer { .. } => ("pause", Some(SHORT_TIMEOUT)),
        Request::ResumeContainer { .. } => ("resume", Some(SHORT_TIMEOUT)),
        Request::UpdateContainer { .. } => ("update", Some(SHORT_TIMEOUT)),
        Request::ContainerStats { .. } => ("stats", Some(SHORT_TIMEOUT)),
        Request::ResizeTerminal { .. } => ("resize", Some(SHORT_TIMEOUT)),
        Request::ListProcesses { .. } => ("list processes", Some(SHORT_TIMEOUT)),
        Request::DeleteContainer { .. } => ("delete", Some(SHORT_TIMEOUT)),
        Request::Shutdown => ("shutdown", Some(SHORT_TIMEOUT)),
    }
}

/// Whether `e` says the agent cannot be talked to (it missed a deadline, refused or dropped
/// the connection, or broke the protocol), as opposed to an answer refusing the request.
pub fn unresponsive(e: &SandboxError) -> bool {
    matches!(
        e,
        SandboxError::AgentTimeout { .. } | SandboxError::AgentIo(_) | SandboxError::Protocol(_)
    )
}

/// A string from the guest as one printable line of at most [`MAX_GUEST_TEXT`] bytes plus a
/// marker: control characters (ESC, CR, LF, DEL, C1) and the invisible formatting characters
/// that reorder or hide text (bidi overrides, zero-width) are escaped as `\u{..}` (`\n`,
/// `\r`, `\t` as such); a longer text is cut at a character boundary and ends with
/// `...[N more bytes]`.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_GUEST_TEXT + 32));
    for (at, c) in text.char_indices() {
        let piece = match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if hides_text(c) => format!("\\u{{{:x}}}", u32::from(c)),
            c => c.to_string(),
        };
        if out.len() + piece.len() > MAX_GUEST_TEXT {
            out.push_str(&format!("...[{} more bytes]", text.len() - at));
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// Control characters and the format characters that change how a terminal or a log viewer
/// lays text out (Trojan Source: bidi embeddings, overrides and isolates; zero-width marks).
fn hides_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A response with every string in it [`sanitize`]d.
fn sanitized(resp: Response) -> Response {
    match resp {
        Response::Hello { version, agent } => Response::Hello {
            version,
            agent: sanitize(&agent),
        },
        Response::Error { kind, message } => Response::Error {
            kind,
            message: sanitize(&message),
        },
        Response::Processes { processes } => Response::Processes {
            processes: processes
                .into_iter()
                .map(|p| ProcessInfo {
                    cmd: sanitize(&p.cmd),
                    ..p
                })
                .collect(),
        },
        other => other,
    }
}

/// Reads one response and cleans it: a broken frame's error quotes guest bytes too.
async fn read_reply(stream: &mut UnixStream) -> Result<Option<Response>, SandboxError> {
    match read_message::<Response, _>(stream).await {
        Ok(resp) => Ok(resp.map(sanitized)),
        Err(e) => Err(SandboxError::Protocol(sanitize(&e.to_string()))),
    }
}

/// [`husk_hypervisor::connect_vsock`] within [`CONNECT_TIMEOUT`].
async fn connect_within(uds: &Path, port: u32) -> Result<UnixStream, SandboxError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_vsock(uds, port)).await {
        Ok(stream) => Ok(stream?),
        Err(_) => Err(SandboxError::AgentTimeout {
            op: "connect",
            after: CONNECT_TIMEOUT,
        }),
    }
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
    /// `None` once a request missed its deadline: its late answer would pair with the next.
    stream: Option<UnixStream>,
}

impl AgentClient {
    /// Connects and shakes hands, retrying while the guest boots, until `deadline`.
    ///
    /// # Errors
    /// [`SandboxError::VersionMismatch`], [`SandboxError::AgentTimeout`] when the agent
    /// accepted but did not answer the handshake, or the last connection error at the
    /// deadline.
    pub async fn connect(uds: &Path, deadline: Instant) -> Result<Self, SandboxError> {
        let start = Instant::now();
        loop {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, connect_vsock(uds, AGENT_PORT)).await {
                Ok(Ok(stream)) => return Self::handshake(uds, stream).await,
                Ok(Err(e)) if Instant::now() >= deadline => return Err(e.into()),
                // The channel takes connections but the guest does not answer them (on the
                // serial channel, opening a stream is the agent's own work).
                Err(_) if Instant::now() >= deadline => {
                    return Err(SandboxError::AgentTimeout {
                        op: "connect",
                        after: deadline.saturating_duration_since(start),
                    })
                }
                _ => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }

    /// Opens another control connection to the same agent (the agent is known to be up).
    ///
    /// # Errors
    /// As [`AgentClient::connect`]; [`SandboxError::AgentTimeout`] when the device or the
    /// agent does not answer in time.
    pub async fn reconnect(&self) -> Result<Self, SandboxError> {
        Self::open(&self.uds).await
    }

    /// A control connection to the agent behind `uds`, which is known to be up: one attempt,
    /// every step within its deadline.
    ///
    /// # Errors
    /// As [`AgentClient::reconnect`].
    pub async fn open(uds: &Path) -> Result<Self, SandboxError> {
        let stream = connect_within(uds, AGENT_PORT).await?;
        Self::handshake(uds, stream).await
    }

    /// A control connection over `stream`, already connected to the agent's port behind `uds`
    /// (a restored VM's ready connection): the version handshake, within its deadline.
    ///
    /// # Errors
    /// As [`AgentClient::connect`].
    pub async fn handshake(uds: &Path, stream: UnixStream) -> Result<Self, SandboxError> {
        let mut client = Self {
            uds: uds.to_owned(),
            stream: Some(stream),
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

    /// Sends `req` and reads its answer, within the request's [`deadline`].
    async fn request(&mut self, req: &Request) -> Result<Response, SandboxError> {
        let (op, limit) = deadline(req);
        let stream = self.stream.as_mut().ok_or_else(|| {
            SandboxError::Protocol(format!(
                "connection abandoned after a missed deadline ({op})"
            ))
        })?;
        let exchange = async {
            write_message(stream, req).await?;
            read_reply(stream).await
        };
        let reply = match limit {
            None => exchange.await,
            Some(after) => {
                let timed = tokio::time::timeout(after, exchange).await;
                let Ok(reply) = timed else {
                    self.stream = None;
                    return Err(SandboxError::AgentTimeout { op, after });
                };
                reply
            }
        };
        match reply? {
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

    /// Gives the guest its own entropy and the host's time ([`GuestIdentity`]): 64 bytes
    /// from the host's `/dev/urandom` and `CLOCK_REALTIME` now.
    ///
    /// # Errors
    /// The host's random source cannot be read, the agent's refusal or a transport error.
    pub async fn set_identity(&mut self) -> Result<(), SandboxError> {
        let mut seed = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .map_err(SandboxError::HostEntropy)?;
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let realtime_ns = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
        self.request_ok(&Request::SetIdentity {
            identity: GuestIdentity { seed, realtime_ns },
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
        // Side by side: each is a connection and a round trip to the guest.
        let stderr = async {
            match terminal {
                true => Ok(None),
                false => self
                    .attach_process(id, exec_id, StdioStream::Stderr)
                    .await
                    .map(Some),
            }
        };
        let (stdin, stdout, stderr) = tokio::try_join!(
            self.attach_process(id, exec_id, StdioStream::Stdin),
            self.attach_process(id, exec_id, StdioStream::Stdout),
            stderr,
        )?;
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
        let conn = connect_within(&self.uds, AGENT_PORT).await?;
        let mut client = Self {
            uds: self.uds.clone(),
            stream: Some(conn),
        };
        client
            .request_ok(&Request::AttachStdio {
                id: id.to_owned(),
                stream,
                exec_id: exec_id.map(str::to_owned),
            })
            .await?;
        client
            .stream
            .ok_or_else(|| SandboxError::Protocol("stdio connection lost".into()))
    }
}

fn unexpected(resp: &Response) -> SandboxError {
    SandboxError::Protocol(sanitize(&format!("unexpected reply {resp:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    async fn test_connect_vsock_symlink_or_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("other-vm.sock");
        let _listener = UnixListener::bind(&real).unwrap();
        let link = dir.path().join("v.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(
            connect_vsock(&link, AGENT_PORT).await.is_err(),
            "a symlink is followed"
        );
        let file = dir.path().join("f.sock");
        std::fs::write(&file, "").unwrap();
        let err = connect_vsock(&file, AGENT_PORT).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
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

    /// A fake agent behind a fake vsock device: answers the handshake, then reads one request
    /// and answers it with `reply` (`None`: never, keeping the connection open).
    async fn fake_agent(listener: UnixListener, reply: Option<Response>) {
        let mut s = fake_device(listener, b"OK 7\n").await;
        let _: Option<Request> = read_message(&mut s).await.unwrap();
        let hello = Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "fake".into(),
        };
        write_message(&mut s, &hello).await.unwrap();
        let _: Option<Request> = read_message(&mut s).await.unwrap();
        match reply {
            Some(reply) => write_message(&mut s, &reply).await.unwrap(),
            None => std::future::pending().await,
        }
    }

    #[test]
    fn test_sanitize_controls_escaped_and_text_capped() {
        assert_eq!(sanitize("plain text"), "plain text");
        assert_eq!(
            sanitize("a\x1b[2Jb\nc\r\u{202e}d\u{7f}"),
            "a\\u{1b}[2Jb\\nc\\r\\u{202e}d\\u{7f}"
        );
        let long = "\u{e9}".repeat(MAX_GUEST_TEXT);
        let cut = sanitize(&long);
        assert!(
            cut.ends_with(&format!("...[{} more bytes]", MAX_GUEST_TEXT)),
            "{cut}"
        );
        assert!(cut.len() <= MAX_GUEST_TEXT + 32, "{}", cut.len());
    }

    #[tokio::test]
    async fn test_request_agent_error_of_1mib_one_sanitized_capped_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hostile = "\x1b]0;owned\x07\x1b[2J\nhusk: fake line\r\n";
        let message = format!(
            "{hostile}{}",
            "x".repeat(husk_protocol::MAX_FRAME_LEN - 200)
        );
        let reply = Response::Error {
            kind: husk_protocol::ErrorKind::Internal,
            message,
        };
        let dev = tokio::spawn(fake_agent(listener, Some(reply)));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut client = AgentClient::connect(&path, deadline).await.unwrap();
        let err = client.signal("c1", 15).await.unwrap_err();
        let line = err.to_string();
        assert!(
            line.starts_with("agent: \\u{1b}]0;owned\\u{7}\\u{1b}[2J\\nhusk"),
            "{line}"
        );
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(line.len() <= MAX_GUEST_TEXT + 64, "{} bytes", line.len());
        assert!(line.contains(" more bytes]"), "{line}");
        dev.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn test_request_silent_agent_times_out_then_connection_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(fake_agent(listener, None));
        let mut client = AgentClient::open(&path).await.unwrap();
        let err = client.signal("c1", 9).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::AgentTimeout { op: "signal", after } if after == SHORT_TIMEOUT),
            "{err}"
        );
        let again = client.signal("c1", 9).await.unwrap_err();
        assert!(matches!(again, SandboxError::Protocol(_)), "{again}");
        dev.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn test_open_device_never_answers_connect_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(async move {
            let _s = fake_device(listener, b"").await;
            std::future::pending::<()>().await;
        });
        let err = AgentClient::open(&path).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::AgentTimeout { op: "connect", .. }),
            "{err}"
        );
        dev.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn test_open_agent_silent_at_handshake_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let dev = tokio::spawn(async move {
            let _s = fake_device(listener, b"OK 7\n").await;
            std::future::pending::<()>().await;
        });
        let err = AgentClient::open(&path).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::AgentTimeout { op: "hello", .. }),
            "{err}"
        );
        dev.abort();
    }
}
