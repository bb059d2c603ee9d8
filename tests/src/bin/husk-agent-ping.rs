//! `husk-agent-ping VSOCK_UDS [TIMEOUT_SECS]`: waits for husk-agent behind a VM's hybrid-vsock
//! socket, does the protocol handshake with husk's own client, prints `agent: <name>`, then asks
//! the agent to power the VM off. For the nested test host, where no bundle is needed to prove
//! that a guest booted and its vsock works.

// A small test tool: failures end it with a message.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_sandbox::agent::AgentClient;

fn main() {
    let mut args = std::env::args().skip(1);
    let uds = PathBuf::from(
        args.next()
            .expect("usage: husk-agent-ping VSOCK_UDS [TIMEOUT_SECS]"),
    );
    let secs: u64 = args
        .next()
        .map_or(60, |s| s.parse().expect("timeout in seconds"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let code = runtime.block_on(async {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let client = match AgentClient::connect(&uds, deadline).await {
            Ok(client) => client,
            Err(e) => {
                eprintln!("husk-agent-ping: {e}");
                return 1;
            }
        };
        println!("agent: handshake after {} ms", start.elapsed().as_millis());
        match client.shutdown().await {
            Ok(()) => {
                println!("agent: shutdown acknowledged");
                0
            }
            Err(e) => {
                eprintln!("husk-agent-ping: shutdown: {e}");
                1
            }
        }
    });
    std::process::exit(code);
}
