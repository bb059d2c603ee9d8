//! The serial channel's multiplexer (husk_protocol::mux) fed what a hostile peer sends: the
//! decoder over any split of the bytes (every frame re-encodes to the bytes it came from), then
//! a guest session and a host session each given the whole input as their channel, which must
//! end or go idle without panicking.
#![no_main]

use husk_protocol::mux::{Decoder, Session};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut decoder = Decoder::default();
    let mut again = Vec::new();
    let mut consumed = 0;
    for chunk in [&data[..split], &data[split..]] {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let before = again.len();
                    frame.encode_into(&mut again);
                    consumed += again.len() - before;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(again[..], data[..consumed]);
    sessions(data);
});

/// Both roles over a channel that carries `data` and then ends.
fn sessions(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for guest in [true, false] {
            let (mut peer, ours) = tokio::io::duplex(1 << 16);
            let (rd, wr) = tokio::io::split(ours);
            let session = if guest {
                let (session, mut accepted) = Session::guest(rd, wr, vec![1024]);
                tokio::spawn(async move {
                    while let Some((_, mut stream)) = accepted.recv().await {
                        let _ = stream.write_all(b"reply").await;
                    }
                });
                session
            } else {
                let session = Session::host(rd, wr);
                let opener = session.clone();
                tokio::spawn(async move {
                    let _ = opener.open(1024).await;
                });
                session
            };
            let _ = peer.write_all(data).await;
            let _ = peer.shutdown().await;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut peer, &mut tokio::io::sink()).await;
            });
            let ended = session.ended();
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), ended).await;
        }
    });
}
