//! Bounded ring buffer for guest data the host stream did not take yet.
//!
//! Its capacity equals the `buf_alloc` we advertise, so a guest that respects its credit can
//! never overflow it; overflowing it means the guest ignored flow control. The storage is
//! allocated on first use, so idle and fast connections cost nothing.

use std::io::{self, ErrorKind, Write};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::CsmError;

/// Ring buffer of at most `capacity` bytes.
#[derive(Debug)]
pub(crate) struct TxBuf {
    data: Option<Box<[u8]>>,
    capacity: usize,
    head: usize,
    len: usize,
}

impl TxBuf {
    /// An empty buffer that will hold at most `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            data: None,
            capacity,
            head: 0,
            len: 0,
        }
    }

    /// Buffered bytes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything buffered; returns how many bytes that was.
    pub(crate) fn clear(&mut self) -> usize {
        let dropped = self.len;
        self.head = 0;
        self.len = 0;
        dropped
    }

    /// Appends all of `src`, or nothing.
    ///
    /// # Errors
    /// [`CsmError::TxBufFull`] if `src` does not fit; [`CsmError::GuestMemory`] if it cannot
    /// be read.
    pub(crate) fn push<B: BitmapSlice>(
        &mut self,
        src: &VolatileSlice<'_, B>,
    ) -> Result<(), CsmError> {
        let incoming = src.len();
        let free = self.capacity.saturating_sub(self.len);
        if incoming > free {
            return Err(CsmError::TxBufFull {
                len: self.len,
                incoming,
                capacity: self.capacity,
            });
        }
        let capacity = self.capacity;
        let tail = self.head.saturating_add(self.len) % capacity.max(1);
        let data = self
            .data
            .get_or_insert_with(|| vec![0u8; capacity].into_boxed_slice());
        let first = incoming.min(capacity.saturating_sub(tail));
        let (src_a, src_b) = src.split_at(first).map_err(CsmError::GuestMemory)?;
        copy_into(data, tail, &src_a)?;
        copy_into(data, 0, &src_b)?;
        self.len = self.len.saturating_add(incoming);
        Ok(())
    }

    /// Writes buffered bytes to `sink` until it would block or the buffer is empty.
    ///
    /// # Errors
    /// Any write error other than `WouldBlock`/`Interrupted`; a zero-length write is
    /// reported as `WriteZero`.
    pub(crate) fn flush_to<W: Write>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut written = 0usize;
        while self.len > 0 {
            let chunk = self.contiguous();
            let result = sink.write(chunk);
            match result {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.consume(n);
                    written = written.saturating_add(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// The buffered bytes from `head` up to the end of the storage or of the data.
    fn contiguous(&self) -> &[u8] {
        let end = self.head.saturating_add(self.len).min(self.capacity);
        self.data
            .as_deref()
            .and_then(|data| data.get(self.head..end))
            .unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            self.head.saturating_add(n) % self.capacity.max(1)
        };
    }
}

/// Copies `src` into `data[at..]`; fails instead of panicking if it does not fit.
fn copy_into<B: BitmapSlice>(
    data: &mut [u8],
    at: usize,
    src: &VolatileSlice<'_, B>,
) -> Result<(), CsmError> {
    let end = at.saturating_add(src.len());
    let dst = data.get_mut(at..end).ok_or(CsmError::GuestMemory(
        vm_memory::VolatileMemoryError::OutOfBounds { addr: end },
    ))?;
    src.copy_to(dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(bytes: &mut [u8]) -> VolatileSlice<'_, ()> {
        VolatileSlice::from(bytes)
    }

    /// A sink taking at most `limit` bytes, then reporting `WouldBlock`.
    struct SlowSink {
        out: Vec<u8>,
        limit: usize,
    }

    impl Write for SlowSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.limit.saturating_sub(self.out.len());
            if room == 0 {
                return Err(io::Error::from(ErrorKind::WouldBlock));
            }
            let n = room.min(buf.len());
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_txbuf_push_over_capacity_rejected() {
        let mut buf = TxBuf::new(8);
        let mut bytes = [1u8; 9];

        let result = buf.push(&slice(&mut bytes));

        assert!(matches!(result, Err(CsmError::TxBufFull { .. })));
        assert!(buf.is_empty());
    }

    #[test]
    fn test_txbuf_wrap_around_preserves_order() {
        let mut buf = TxBuf::new(8);
        let mut sink = SlowSink {
            out: Vec::new(),
            limit: 6,
        };
        buf.push(&slice(&mut [1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(buf.flush_to(&mut sink).unwrap(), 6);
        buf.push(&slice(&mut [7, 8, 9, 10, 11])).unwrap();
        sink.limit = 100;

        let written = buf.flush_to(&mut sink).unwrap();

        assert_eq!(written, 5);
        assert_eq!(sink.out, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(buf.is_empty());
    }

    #[test]
    fn test_txbuf_flush_would_block_keeps_rest() {
        let mut buf = TxBuf::new(16);
        let mut sink = SlowSink {
            out: Vec::new(),
            limit: 3,
        };
        buf.push(&slice(&mut [1, 2, 3, 4, 5])).unwrap();

        let written = buf.flush_to(&mut sink).unwrap();

        assert_eq!(written, 3);
        assert_eq!(buf.len(), 2);
    }
}
