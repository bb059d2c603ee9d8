//! The host's side of the protocol: a stream of frames from a hostile agent decoded as
//! responses, each turned into what the host makes of it (the error a caller sees, the text of
//! an unexpected reply). A decoded response encodes to a frame that decodes to the same one.
#![no_main]

use husk_fuzz::block_on;
use husk_protocol::{decode_body, encode, read_message, Response, HEADER_LEN};
use husk_sandbox::SandboxError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    for _ in 0..16 {
        match block_on(read_message::<Response, _>(&mut reader)) {
            Ok(Some(response)) => {
                shown(&response);
                roundtrip(&response);
            }
            Ok(None) => break,
            Err(e) => {
                let _ = SandboxError::from(e).to_string();
                break;
            }
        }
    }
});

/// As runtime/sandbox/src/agent.rs turns a response into an error or a log line.
fn shown(response: &Response) {
    let error = match response {
        Response::Error { kind, message } => SandboxError::Agent {
            kind: *kind,
            message: message.clone(),
        },
        other => SandboxError::Protocol(format!("unexpected reply {other:?}")),
    };
    let _ = error.to_string();
}

fn roundtrip(response: &Response) {
    let Ok(frame) = encode(response) else {
        return; // over the frame limit once re-encoded (escapes grow a string)
    };
    let again: Response = decode_body(&frame[HEADER_LEN..]).expect("an encoded response decodes");
    assert_eq!(&again, response);
}
