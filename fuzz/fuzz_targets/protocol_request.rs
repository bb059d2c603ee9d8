//! The agent's side of the protocol: a stream of frames from the host decoded as requests,
//! each checked as the agent checks it before acting. A decoded request encodes to a frame
//! that decodes to the same request.
#![no_main]

use husk_fuzz::block_on;
use husk_protocol::{decode_body, encode, read_message, validate_id, Request, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    for _ in 0..16 {
        match block_on(read_message::<Request, _>(&mut reader)) {
            Ok(Some(request)) => {
                check(&request);
                roundtrip(&request);
            }
            Ok(None) | Err(_) => break,
        }
    }
});

/// What the agent's handlers validate (guest-agent/agent/src/{container,exec,network,init}.rs).
fn check(request: &Request) {
    match request {
        Request::CreateContainer { spec } => {
            let _ = spec.validate();
            for key in spec.sysctl.keys() {
                let _ = husk_protocol::sysctl_namespace(key);
            }
            for mount in &spec.mounts {
                let _ = mount.kind.fstype();
            }
            let _ = spec.resources.cpu_max();
        }
        Request::ExecProcess {
            id,
            exec_id,
            process,
            ..
        } => {
            let _ = validate_id(id);
            let _ = validate_id(exec_id);
            let _ = process.validate();
        }
        Request::UpdateContainer { resources, .. } => {
            let _ = resources.validate();
            let _ = resources.cpu_max();
        }
        Request::ConfigureNetwork { network } => {
            let _ = network.validate();
            let _ = network.mac_bytes();
        }
        Request::SetIdentity { identity } => {
            let _ = identity.validate();
        }
        _ => {}
    }
}

fn roundtrip(request: &Request) {
    let Ok(frame) = encode(request) else {
        return; // over the frame limit once re-encoded (escapes grow a string)
    };
    let again: Request = decode_body(&frame[HEADER_LEN..]).expect("an encoded request decodes");
    assert_eq!(&again, request);
}
