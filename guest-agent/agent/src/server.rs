//! The server: one task per host connection (a vsock connection, or a stream of the serial
//! channel, [`crate::channel`]), requests answered in order.
//!
//! A connection is either a request channel (`Hello` first, then any requests) or, when its
//! first message is `AttachStdio`, a raw byte stream for one stdio stream of a container.

use husk_protocol::{read_message, write_message, ErrorKind, Request, Response, StdioStream};
use husk_protocol::{AGENT_PORT, PROTOCOL_VERSION, SAVE_PORT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::container::{copy_output, copy_stdin, Attached, Containers};
use crate::exec::Execs;
use crate::{init, reaper};

/// What every connection serves: the containers and their exec processes.
#[derive(Debug, Clone, Default)]
struct Agent {
    containers: Containers,
    execs: Execs,
}

/// How long a shutdown waits for the host to take the acknowledgement and hang up.
const SHUTDOWN_ACK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Accepts host connections forever; as PID 1, first prepares what containers will take
/// ([`Containers::prepare`]).
pub async fn serve(pid1: bool) -> std::io::Result<()> {
    let agent = Agent::default();
    let exits = agent.containers.exits();
    tokio::spawn(async move {
        if let Err(e) = reaper::run(exits).await {
            eprintln!("husk-agent: reaper: {e}");
        }
    });
    if pid1 {
        agent.containers.prepare().await;
    }
    if crate::channel::serial_requested() {
        return crate::channel::serve_serial(|port, stream| {
            let (rd, wr) = tokio::io::split(stream);
            match port {
                SAVE_PORT => tokio::spawn(ready_to_save(rd, wr)),
                _ => tokio::spawn(connection(rd, wr, agent.clone())),
            };
        })
        .await;
    }
    // Without it a snapshot of the VM only holds more: never a reason to stop serving.
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, SAVE_PORT)) {
        Ok(saves) => {
            tokio::spawn(async move {
                loop {
                    match saves.accept().await {
                        Ok((stream, _)) => {
                            let (rd, wr) = stream.into_split();
                            tokio::spawn(ready_to_save(rd, wr));
                        }
                        Err(e) => return eprintln!("husk-agent: save port: {e}"),
                    }
                }
            });
        }
        Err(e) => eprintln!("husk-agent: save port: {e}"),
    }
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (rd, wr) = stream.into_split();
        tokio::spawn(connection(rd, wr, agent.clone()));
    }
}

/// A connection to [`SAVE_PORT`]: the guest's free memory is given back as zeros
/// ([`crate::sys::zero_free_memory`]), then the connection closes. A failure only costs the
/// snapshot its size; it is logged on the console.
async fn ready_to_save<R, W>(rd: R, wr: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    use std::sync::atomic::{AtomicBool, Ordering};
    /// One at a time: two would take the reserve each leaves free.
    static ZEROING: AtomicBool = AtomicBool::new(false);
    if !ZEROING.swap(true, Ordering::AcqRel) {
        match tokio::task::spawn_blocking(crate::sys::zero_free_memory).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("husk-agent: zeroing free memory: {e}"),
            Err(e) => eprintln!("husk-agent: zeroing free memory: {e}"),
        }
        ZEROING.store(false, Ordering::Release);
    }
    drop((rd, wr));
}

async fn connection<R, W>(mut rd: R, mut wr: W, agent: Agent)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let request = match read_message::<Request, _>(&mut rd).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                let reply = error(ErrorKind::InvalidRequest, format!("bad request: {e}"));
                let _ = write_message(&mut wr, &reply).await;
                return;
            }
        };
        match request {
            Request::AttachStdio {
                id,
                stream,
                exec_id,
            } => return attach(rd, wr, &agent, &id, exec_id.as_deref(), stream).await,
            Request::Shutdown => {
                let _ = write_message(&mut wr, &Response::Ok).await;
                // The reply is only queued in the guest's socket: powering off now can lose it.
                // The host closes the connection once it has the reply; wait for that, briefly.
                let mut rest = [0u8; 64];
                let _ = tokio::time::timeout(SHUTDOWN_ACK_GRACE, async {
                    while matches!(rd.read(&mut rest).await, Ok(n) if n > 0) {}
                })
                .await;
                init::power_off();
            }
            request => {
                let reply = handle(&agent, request).await;
                if write_message(&mut wr, &reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn handle(agent: &Agent, request: Request) -> Response {
    let containers = &agent.containers;
    let result = match request {
        Request::Hello { .. } => {
            // The host compares versions; the agent always says which one it speaks.
            return Response::Hello {
                version: PROTOCOL_VERSION,
                agent: concat!("husk-agent ", env!("CARGO_PKG_VERSION")).to_owned(),
            };
        }
        Request::CreateContainer { spec } => containers.create(*spec).await.map(|()| Response::Ok),
        Request::StartContainer { id } => containers
            .start(&id)
            .await
            .map(|pid| Response::Started { pid }),
        Request::WaitContainer { id } => containers
            .wait(&id)
            .await
            .map(|(code, oom_killed)| Response::Exited { code, oom_killed }),
        Request::SignalContainer { id, signal, all } => {
            containers.signal(&id, signal, all).map(|()| Response::Ok)
        }
        Request::ExecProcess {
            id,
            exec_id,
            process,
            detach,
        } => agent
            .execs
            .exec(containers, &id, &exec_id, process, detach)
            .await
            .map(|pid| Response::Started { pid }),
        Request::WaitProcess { id, exec_id } => {
            agent
                .execs
                .wait(&id, &exec_id)
                .await
                .map(|code| Response::Exited {
                    code,
                    oom_killed: false,
                })
        }
        Request::SignalProcess {
            id,
            exec_id,
            signal,
        } => agent
            .execs
            .signal(&id, &exec_id, signal)
            .map(|()| Response::Ok),
        Request::PauseContainer { id } => containers.pause(&id, true).await.map(|()| Response::Ok),
        Request::ResumeContainer { id } => {
            containers.pause(&id, false).await.map(|()| Response::Ok)
        }
        Request::UpdateContainer { id, resources } => {
            containers.update(&id, &resources).map(|()| Response::Ok)
        }
        Request::ContainerStats { id } => {
            containers.stats(&id).map(|stats| Response::Stats { stats })
        }
        Request::ResizeTerminal {
            id,
            exec_id,
            rows,
            cols,
        } => match exec_id {
            None => containers.resize(&id, rows, cols),
            Some(exec_id) => agent.execs.resize(&id, &exec_id, rows, cols),
        }
        .map(|()| Response::Ok),
        Request::SetIdentity { identity } => identity
            .validate()
            .map_err(|e| (ErrorKind::InvalidRequest, e))
            .and_then(|()| {
                crate::init::set_identity(&identity)
                    .map_err(|e| (ErrorKind::Internal, format!("identity: {e}")))
            })
            .map(|()| Response::Ok),
        Request::ConfigureNetwork { network } => crate::network::configure(&network)
            .await
            .map(|()| Response::Ok),
        Request::DeleteContainer { id } => containers.delete(&id).map(|()| {
            agent.execs.forget(&id);
            Response::Ok
        }),
        Request::ListProcesses { id } => containers
            .processes(&id)
            .map(|processes| Response::Processes { processes }),
        Request::AttachStdio { .. } | Request::Shutdown => {
            Err((ErrorKind::InvalidRequest, "not valid here".to_owned()))
        }
    };
    result.unwrap_or_else(|(kind, message)| error(kind, message))
}

async fn attach<R, W>(
    rd: R,
    mut wr: W,
    agent: &Agent,
    id: &str,
    exec_id: Option<&str>,
    stream: StdioStream,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let attached = match exec_id {
        None => agent.containers.attach(id, stream),
        Some(exec_id) => agent.execs.attach(id, exec_id, stream),
    };
    let attached = match attached {
        Ok(attached) => attached,
        Err((kind, message)) => {
            let _ = write_message(&mut wr, &error(kind, message)).await;
            return;
        }
    };
    let replied = write_message(&mut wr, &Response::Ok).await.is_ok();
    match attached {
        Attached::Stdin(fd) => copy_stdin(rd, fd).await,
        Attached::Output(fd, open) => copy_output(fd, replied.then_some(wr), open).await,
    }
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}
