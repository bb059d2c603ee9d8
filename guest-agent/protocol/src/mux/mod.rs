//! The stream multiplexer of the QEMU door's guest channel: many byte streams over one
//! virtio-serial port.
//!
//! QEMU cannot migrate its vhost-user vsock device, so a QEMU guest that is saved and restored
//! talks to the host over one virtio-serial port instead, and this multiplexer gives it what
//! vsock gave: independent streams, each with its own flow control, opened by the host to a
//! guest port. The host side is `husk-vmm serial-relay`, which serves the same hybrid vsock
//! socket (`CONNECT <port>\n`, `OK <port>\n`) as the vsock device, so nothing above the door
//! knows which channel a VM has.
//!
//! # Wire
//! A frame is a 9-byte header (stream id `u32` LE, kind `u8`, payload length `u32` LE) and its
//! payload; [`Decoder`] checks every length and kind before it allocates.
//! - Session frames (stream 0): [`Kind::Hello`] (host: a new host side; the guest forgets every
//!   stream), [`Kind::Quiesce`] (host: the VM is about to be saved; the guest closes every
//!   stream and sends nothing more until the next hello) and [`Kind::Quiesced`] (its answer).
//! - Stream frames: only the host opens ([`Kind::Open`] with the port as `u32` LE); the guest
//!   answers [`Kind::Opened`] or [`Kind::Refused`]. Then both sides send [`Kind::Data`] (at
//!   most [`MAX_DATA`] bytes), [`Kind::Eof`] (no more data from the sender), [`Kind::Close`]
//!   (the sender neither sends nor reads any more; what it sent stays readable) and
//!   [`Kind::Credit`] (`u32` LE: bytes the sender's reader consumed).
//!
//! # Flow control
//! Each side may have at most [`WINDOW`] bytes of a stream unconsumed at the other; the reader
//! returns credit as it consumes. A peer that sends past its credit, or any malformed frame,
//! ends the session: a hostile guest only breaks its own channel.

#[cfg(feature = "tokio")]
mod session;

#[cfg(feature = "tokio")]
pub use session::{MuxStream, Session};

/// Bytes of a frame header.
pub const MUX_HEADER_LEN: usize = 9;
/// Largest payload of a [`Kind::Data`] frame.
pub const MAX_DATA: usize = 32 * 1024;
/// Bytes of a stream a side may have sent and the other not yet consumed.
pub const WINDOW: u32 = 256 * 1024;

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Host, stream 0: a new host side; every stream is gone.
    Hello,
    /// Host: open a stream to a guest port (payload: the port, `u32` LE).
    Open,
    /// Guest: the stream is open.
    Opened,
    /// Guest: nothing listens on that port.
    Refused,
    /// Bytes of the stream.
    Data,
    /// The sender sends no more data on the stream.
    Eof,
    /// The sender is done with the stream.
    Close,
    /// The sender consumed this many bytes (payload `u32` LE).
    Credit,
    /// Host, stream 0: close every stream and go quiet until the next hello.
    Quiesce,
    /// Guest, stream 0: quiet.
    Quiesced,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::Open => 2,
            Kind::Opened => 3,
            Kind::Refused => 4,
            Kind::Data => 5,
            Kind::Eof => 6,
            Kind::Close => 7,
            Kind::Credit => 8,
            Kind::Quiesce => 9,
            Kind::Quiesced => 10,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::Open,
            3 => Kind::Opened,
            4 => Kind::Refused,
            5 => Kind::Data,
            6 => Kind::Eof,
            7 => Kind::Close,
            8 => Kind::Credit,
            9 => Kind::Quiesce,
            10 => Kind::Quiesced,
            _ => return None,
        })
    }

    /// Whether the kind belongs to stream 0, and the payload lengths it allows.
    fn shape(self) -> (bool, std::ops::RangeInclusive<usize>) {
        match self {
            Kind::Hello | Kind::Quiesce | Kind::Quiesced => (true, 0..=0),
            Kind::Open | Kind::Credit => (false, 4..=4),
            Kind::Opened | Kind::Refused | Kind::Eof | Kind::Close => (false, 0..=0),
            Kind::Data => (false, 1..=MAX_DATA),
        }
    }
}

/// A malformed frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    /// The kind byte is none of [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A session frame on a stream, or a stream frame on stream 0.
    #[error("{kind:?} frame on stream {stream}")]
    WrongStream {
        /// The frame's kind.
        kind: Kind,
        /// Its stream.
        stream: u32,
    },
    /// A payload length the kind does not allow.
    #[error("{kind:?} frame with {len} payload bytes")]
    BadLength {
        /// The frame's kind.
        kind: Kind,
        /// The announced length.
        len: usize,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its stream; 0 for session frames.
    pub stream: u32,
    /// What it says.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame without payload.
    pub fn empty(stream: u32, kind: Kind) -> Self {
        Self::new(stream, kind, Vec::new())
    }

    /// A frame whose payload is one `u32` (open's port, credit's bytes).
    pub fn number(stream: u32, kind: Kind, value: u32) -> Self {
        Self::new(stream, kind, value.to_le_bytes().to_vec())
    }

    /// A frame with a payload.
    pub fn new(stream: u32, kind: Kind, payload: Vec<u8>) -> Self {
        Self {
            stream,
            kind,
            payload,
        }
    }

    /// The payload as one `u32` (see [`Frame::number`]); 0 when it is not 4 bytes long.
    pub fn value(&self) -> u32 {
        <[u8; 4]>::try_from(self.payload.as_slice()).map_or(0, u32::from_le_bytes)
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.push(self.kind.code());
        // Payloads are at most MAX_DATA bytes (the callers' chunks), far below u32::MAX.
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.payload);
    }
}

/// Turns received bytes into frames, checking each header before its payload is taken.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` until one is complete.
    ///
    /// # Errors
    /// [`MuxError`] for a malformed header; the decoder is then of no further use.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, MuxError> {
        let rest = self.buf.get(self.start..).unwrap_or_default();
        let Some(header) = rest.get(..MUX_HEADER_LEN) else {
            return Ok(None);
        };
        let mut word = [0u8; 4];
        word.copy_from_slice(header.get(..4).unwrap_or_default());
        let stream = u32::from_le_bytes(word);
        let code = header.get(4).copied().unwrap_or_default();
        word.copy_from_slice(header.get(5..9).unwrap_or_default());
        let len = usize::try_from(u32::from_le_bytes(word)).unwrap_or(usize::MAX);
        let kind = Kind::from_code(code).ok_or(MuxError::UnknownKind(code))?;
        let (session, lengths) = kind.shape();
        if session != (stream == 0) {
            return Err(MuxError::WrongStream { kind, stream });
        }
        if !lengths.contains(&len) {
            return Err(MuxError::BadLength { kind, len });
        }
        let Some(payload) = rest.get(MUX_HEADER_LEN..MUX_HEADER_LEN + len) else {
            return Ok(None);
        };
        let frame = Frame::new(stream, kind, payload.to_vec());
        self.start += MUX_HEADER_LEN + len;
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode_into(&mut out);
        }
        out
    }

    #[test]
    fn test_frames_round_trip_split_anywhere() {
        let frames = vec![
            Frame::empty(0, Kind::Hello),
            Frame::number(7, Kind::Open, 1024),
            Frame::new(7, Kind::Data, vec![1; MAX_DATA]),
            Frame::number(7, Kind::Credit, 99),
            Frame::empty(7, Kind::Eof),
            Frame::empty(0, Kind::Quiesced),
        ];
        let wire = bytes(&frames);
        for cut in [1, 5, 9, 10, 4000, wire.len() - 1] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in [&wire[..cut], &wire[cut..]] {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "cut at {cut}");
        }
        assert_eq!(frames[1].value(), 1024);
    }

    #[test]
    fn test_malformed_headers_refused_before_payload() {
        let cases: Vec<(Vec<u8>, MuxError)> = vec![
            (vec![1, 0, 0, 0, 42, 0, 0, 0, 0], MuxError::UnknownKind(42)),
            (
                bytes(&[Frame::empty(3, Kind::Hello)]),
                MuxError::WrongStream {
                    kind: Kind::Hello,
                    stream: 3,
                },
            ),
            (
                bytes(&[Frame::empty(0, Kind::Eof)]),
                MuxError::WrongStream {
                    kind: Kind::Eof,
                    stream: 0,
                },
            ),
            (
                vec![1, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff],
                MuxError::BadLength {
                    kind: Kind::Data,
                    len: 0xffff_ffff,
                },
            ),
            (
                bytes(&[Frame::empty(1, Kind::Data)]),
                MuxError::BadLength {
                    kind: Kind::Data,
                    len: 0,
                },
            ),
            (
                bytes(&[Frame::number(1, Kind::Eof, 3)]),
                MuxError::BadLength {
                    kind: Kind::Eof,
                    len: 4,
                },
            ),
        ];
        for (wire, want) in cases {
            let mut d = Decoder::default();
            d.push(&wire);
            assert_eq!(d.next_frame(), Err(want));
        }
    }
}
