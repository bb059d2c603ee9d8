//! husk-agent: PID 1 of the guest VM.
//!
//! It prepares the guest ([`init`]), then serves the host over vsock port (or the serial channel,
//! [`channel`])
//! [`husk_protocol::AGENT_PORT`] ([`server`]): one VM, one or more containers, each a child in its
//! own namespaces ([`container`]). The same binary, started as `husk-agent container-init`, is the
//! first process of a container: it finishes the container's setup from the inside and execs the
//! bundle's process ([`container_init`]); as `husk-agent exec-init`, it starts an exec process in
//! a running container ([`exec_init`], for [`exec`]).

mod cgroup;
mod channel;
mod container;
mod container_init;
mod exec;
mod exec_init;
mod hooks;
mod init;
mod mounts;
mod namespaces;
mod network;
mod privileges;
mod reaper;
mod seccomp;
mod server;
mod sys;
mod syscalls;

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args_os().nth(1) {
        Some(mode) if mode == container_init::ARG => return container_init::main(),
        Some(mode) if mode == container_init::SPARE_ARG => return container_init::main_spare(),
        Some(mode) if mode == exec_init::ARG => return exec_init::main(),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    let result = run(pid1);
    if let Err(e) = &result {
        eprintln!("husk-agent: {e}");
    }
    if pid1 {
        // PID 1 must not return (the kernel would panic); end the VM instead.
        init::power_off();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn run(pid1: bool) -> std::io::Result<()> {
    if pid1 {
        init::setup()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::serve(pid1))
}
