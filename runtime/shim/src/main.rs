//! `containerd-shim-husk-v2`: containerd's shim v2 for husk (`runtime_type =
//! "io.containerd.husk.v2"`). One shim process per pod, one VM per shim: containerd groups the
//! containers of a pod (the `io.kubernetes.cri.sandbox-id` annotation) onto the same shim,
//! which creates each of them in the pod's VM through the agent; a container without the
//! annotation is a pod of its own.
//!
//! - [`shim`]: the binary's `start` and `delete` subcommands (the `containerd-shim` crate
//!   runs them) and where a pod's files live;
//! - [`task`]: the ttrpc Task service;
//! - [`io`]: the FIFOs (or log files) containerd hands over, relayed to the agent's streams;
//! - [`logger`]: containerd's binary logging protocol (`binary://` stdio URIs).
#![forbid(unsafe_code)]

mod io;
mod logger;
mod shim;
mod task;

use containerd_shim::Config;

/// containerd's name for this runtime.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = Config {
        // The shim's children are the VMM and virtiofsd, reaped by the door that spawned
        // them; a global reaper would take their exit statuses from it.
        no_reaper: true,
        no_sub_reaper: true,
        // Logging goes through `tracing` to containerd's log FIFO (see `shim::init_logging`).
        no_setup_logger: true,
        ..Config::default()
    };
    containerd_shim::run::<shim::HuskShim>(RUNTIME_ID, Some(config)).await;
}
