//! One side of a multiplexed channel ([`super`]): a reader task that decodes and dispatches
//! frames, a writer task that sends them in order, and [`MuxStream`]s that read and write
//! through them with credit.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Decoder, Frame, Kind, MAX_DATA, WINDOW};

/// Consumed bytes a reader returns as credit at once (fewer frames than one per read).
const CREDIT_BATCH: u32 = WINDOW / 4;
/// Streams the guest has accepted and its server not yet taken.
const ACCEPT_BACKLOG: usize = 64;
/// Bytes the writer task gathers into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Which side of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Host,
    Guest,
}

/// One side of a multiplexed channel; clones share it. The session ends when the channel
/// does (end of file, an I/O error or a malformed frame): every stream then reads end of file
/// and fails to write.
#[derive(Debug, Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    role: Role,
    out: mpsc::UnboundedSender<Frame>,
    state: Mutex<State>,
    /// Why the session ended, once it did.
    ended: watch::Sender<Option<String>>,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<u32, Arc<Cell>>,
    /// Host: opens waiting for the guest's answer.
    opening: HashMap<u32, oneshot::Sender<bool>>,
    next_id: u32,
    /// Host: a quiesce waiting for its answer.
    quiescing: Option<oneshot::Sender<()>>,
    /// No more streams: the session ended, or (host) it was quiesced.
    closed: bool,
    ended: bool,
}

/// A stream's state, shared by its [`MuxStream`] and the reader task.
#[derive(Debug, Default)]
struct Cell {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rx: VecDeque<Vec<u8>>,
    /// Bytes of `rx`'s front already read.
    rx_offset: usize,
    /// Bytes in `rx` not yet read.
    rx_buffered: usize,
    /// Bytes read and not yet returned as credit.
    consumed: u32,
    rx_eof: bool,
    rx_waker: Option<Waker>,
    /// Bytes this side may still send.
    credit: u32,
    tx_eof: bool,
    tx_waker: Option<Waker>,
    /// The peer is done with the stream, or the session ended: writes fail.
    broken: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cell {
    fn new() -> Arc<Self> {
        let cell = Cell::default();
        lock(&cell.inner).credit = WINDOW;
        Arc::new(cell)
    }

    /// The peer is gone from the stream: reads end after what is buffered, writes fail.
    fn break_off(&self) {
        let mut inner = lock(&self.inner);
        inner.broken = true;
        inner.rx_eof = true;
        wake(&mut inner.rx_waker);
        wake(&mut inner.tx_waker);
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

impl Session {
    /// The host side over `io`: says hello, then opens streams with [`Session::open`].
    pub fn host<R, W>(rd: R, wr: W) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let session = Self::start(Role::Host, rd, wr, None);
        session.send(Frame::empty(0, Kind::Hello));
        session
    }

    /// The guest side over `io`: streams the host opens to a port in `ports` arrive on the
    /// returned receiver with their port; others are refused.
    pub fn guest<R, W>(rd: R, wr: W, ports: Vec<u32>) -> (Self, mpsc::Receiver<(u32, MuxStream)>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        (Self::start(Role::Guest, rd, wr, Some((tx, ports))), rx)
    }

    fn start<R, W>(role: Role, rd: R, wr: W, accept: Option<Accept>) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, frames) = mpsc::unbounded_channel();
        let session = Self {
            shared: Arc::new(Shared {
                role,
                out,
                state: Mutex::new(State::default()),
                ended: watch::channel(None).0,
            }),
        };
        let reader = session.clone();
        tokio::spawn(async move {
            let why = reader.read_loop(rd, accept).await;
            reader.end(why);
        });
        let writer = session.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(wr, frames).await {
                writer.end(format!("channel write: {e}"));
            }
        });
        session
    }

    /// Opens a stream to the guest's `port`. The caller bounds the wait.
    ///
    /// # Errors
    /// `ConnectionRefused` when the guest refuses or the session ended or was quiesced.
    pub async fn open(&self, port: u32) -> io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        let stream = {
            let mut state = lock(&self.shared.state);
            if state.closed || self.shared.role != Role::Host {
                return Err(io::ErrorKind::ConnectionRefused.into());
            }
            let mut id = state.next_id;
            loop {
                id = id.wrapping_add(1);
                if id != 0 && !state.streams.contains_key(&id) {
                    break;
                }
            }
            state.next_id = id;
            let cell = Cell::new();
            state.streams.insert(id, cell.clone());
            state.opening.insert(id, tx);
            MuxStream {
                shared: self.shared.clone(),
                id,
                cell,
            }
        };
        self.send(Frame::number(stream.id, Kind::Open, port));
        match rx.await {
            Ok(true) => Ok(stream),
            _ => Err(io::ErrorKind::ConnectionRefused.into()),
        }
    }

    /// Host: asks the guest to close every stream and go quiet, and waits for its answer;
    /// afterwards no stream opens. The caller bounds the wait.
    ///
    /// # Errors
    /// `BrokenPipe` when the session ends first.
    pub async fn quiesce(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            if state.ended {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            state.closed = true;
            state.quiescing = Some(tx);
        }
        self.send(Frame::empty(0, Kind::Quiesce));
        rx.await.map_err(|_| io::ErrorKind::BrokenPipe.into())
    }

    /// Waits until the session ended and says why.
    pub async fn ended(&self) -> String {
        let mut ended = self.shared.ended.subscribe();
        let why = match ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "channel closed".to_owned(),
        };
        why
    }

    fn send(&self, frame: Frame) {
        // After the writer ended, the session has ended too and the frame has no reader.
        let _ = self.shared.out.send(frame);
    }

    fn end(&self, why: String) {
        let (cells, opening, quiescing) = {
            let mut state = lock(&self.shared.state);
            if !state.ended {
                state.ended = true;
                self.shared.ended.send_replace(Some(why));
            }
            state.closed = true;
            (
                std::mem::take(&mut state.streams),
                std::mem::take(&mut state.opening),
                state.quiescing.take(),
            )
        };
        for cell in cells.values() {
            cell.break_off();
        }
        drop((opening, quiescing));
    }

    async fn read_loop<R: AsyncRead + Unpin>(&self, mut rd: R, accept: Option<Accept>) -> String {
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) => return "channel closed".to_owned(),
                Ok(n) => n,
                Err(e) => return format!("channel read: {e}"),
            };
            decoder.push(buf.get(..n).unwrap_or_default());
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if let Err(e) = self.dispatch(frame, accept.as_ref()) {
                            return e;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("malformed frame: {e}"),
                }
            }
        }
    }

    /// Acts on one frame; `Err` ends the session with the reason.
    fn dispatch(&self, frame: Frame, accept: Option<&Accept>) -> Result<(), String> {
        let role = self.shared.role;
        let unexpected = || Err(format!("unexpected {:?} frame", frame.kind));
        match (frame.kind, role) {
            (Kind::Hello, Role::Guest) => {
                self.forget_streams(false);
                Ok(())
            }
            (Kind::Quiesce, Role::Guest) => {
                self.forget_streams(true);
                self.send(Frame::empty(0, Kind::Quiesced));
                Ok(())
            }
            (Kind::Quiesced, Role::Host) => {
                if let Some(tx) = lock(&self.shared.state).quiescing.take() {
                    let _ = tx.send(());
                }
                Ok(())
            }
            (Kind::Open, Role::Guest) => {
                self.accept(frame.stream, frame.value(), accept);
                Ok(())
            }
            (Kind::Opened | Kind::Refused, Role::Host) => {
                let mut state = lock(&self.shared.state);
                let Some(tx) = state.opening.remove(&frame.stream) else {
                    return unexpected();
                };
                if frame.kind == Kind::Refused {
                    state.streams.remove(&frame.stream);
                }
                let _ = tx.send(frame.kind == Kind::Opened);
                Ok(())
            }
            (Kind::Data | Kind::Eof | Kind::Close | Kind::Credit, _) => self.on_stream(frame),
            _ => unexpected(),
        }
    }

    /// Guest: breaks every stream (a new host side, or the VM is about to be saved).
    fn forget_streams(&self, quiet: bool) {
        let cells = {
            let mut state = lock(&self.shared.state);
            state.closed = quiet;
            std::mem::take(&mut state.streams)
        };
        for cell in cells.values() {
            cell.break_off();
        }
    }

    fn accept(&self, id: u32, port: u32, accept: Option<&Accept>) {
        let mut state = lock(&self.shared.state);
        let taken = state.closed || state.streams.contains_key(&id);
        let Some((tx, _)) = accept.filter(|(_, ports)| !taken && ports.contains(&port)) else {
            drop(state);
            return self.send(Frame::empty(id, Kind::Refused));
        };
        let cell = Cell::new();
        let stream = MuxStream {
            shared: self.shared.clone(),
            id,
            cell: cell.clone(),
        };
        match tx.try_send((port, stream)) {
            Ok(()) => {
                state.streams.insert(id, cell);
                drop(state);
                self.send(Frame::empty(id, Kind::Opened));
            }
            Err(
                mpsc::error::TrySendError::Full((_, stream))
                | mpsc::error::TrySendError::Closed((_, stream)),
            ) => {
                // Refused: its drop must not say Close for a stream the host never had.
                lock(&stream.cell.inner).broken = true;
                drop(state);
                self.send(Frame::empty(id, Kind::Refused));
            }
        }
    }

    fn on_stream(&self, frame: Frame) -> Result<(), String> {
        let cell = lock(&self.shared.state).streams.get(&frame.stream).cloned();
        // A frame for a stream this side already closed: the peer had not seen the close.
        let Some(cell) = cell else {
            return Ok(());
        };
        let mut inner = lock(&cell.inner);
        match frame.kind {
            Kind::Data => {
                let len = frame.payload.len();
                let outstanding = inner
                    .rx_buffered
                    .saturating_add(len)
                    .saturating_add(inner.consumed as usize);
                if inner.rx_eof || outstanding > WINDOW as usize {
                    return Err(format!(
                        "stream {} sent past its end or credit",
                        frame.stream
                    ));
                }
                inner.rx_buffered += len;
                inner.rx.push_back(frame.payload);
                wake(&mut inner.rx_waker);
            }
            Kind::Eof => {
                inner.rx_eof = true;
                wake(&mut inner.rx_waker);
            }
            Kind::Close => {
                drop(inner);
                cell.break_off();
                lock(&self.shared.state).streams.remove(&frame.stream);
            }
            _ => {
                let credit = inner.credit.saturating_add(frame.value());
                if credit > WINDOW {
                    return Err(format!("stream {} returned too much credit", frame.stream));
                }
                inner.credit = credit;
                wake(&mut inner.tx_waker);
            }
        }
        Ok(())
    }
}

type Accept = (mpsc::Sender<(u32, MuxStream)>, Vec<u32>);

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut frames: mpsc::UnboundedReceiver<Frame>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BATCH + MAX_DATA);
    while let Some(frame) = frames.recv().await {
        buf.clear();
        frame.encode_into(&mut buf);
        while buf.len() < WRITE_BATCH {
            match frames.try_recv() {
                Ok(more) => more.encode_into(&mut buf),
                Err(_) => break,
            }
        }
        wr.write_all(&buf).await?;
        wr.flush().await?;
    }
    Ok(())
}

/// One stream of a [`Session`]: a byte stream like a socket's. Shutting its write side down
/// sends end of file; dropping it closes the stream (the peer's writes then fail).
#[derive(Debug)]
pub struct MuxStream {
    shared: Arc<Shared>,
    id: u32,
    cell: Arc<Cell>,
}

impl MuxStream {
    fn send(&self, frame: Frame) {
        let _ = self.shared.out.send(frame);
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.cell.inner);
        let mut read = 0usize;
        while buf.remaining() > 0 {
            let offset = inner.rx_offset;
            let Some(front) = inner.rx.front() else {
                break;
            };
            let chunk = front.get(offset..).unwrap_or_default();
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(chunk.get(..n).unwrap_or_default());
            read += n;
            if offset + n >= front.len() {
                inner.rx.pop_front();
                inner.rx_offset = 0;
            } else {
                inner.rx_offset = offset + n;
            }
        }
        if read == 0 {
            if inner.rx_eof {
                return Poll::Ready(Ok(()));
            }
            inner.rx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        inner.rx_buffered -= read;
        // `read` is at most the window, which is a u32.
        inner.consumed = inner
            .consumed
            .saturating_add(u32::try_from(read).unwrap_or(u32::MAX));
        if inner.consumed >= CREDIT_BATCH && !inner.broken {
            let credit = std::mem::take(&mut inner.consumed);
            drop(inner);
            self.send(Frame::number(self.id, Kind::Credit, credit));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = lock(&self.cell.inner);
        if inner.broken || inner.tx_eof {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if inner.credit == 0 {
            inner.tx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(MAX_DATA).min(inner.credit as usize);
        inner.credit -= u32::try_from(n).unwrap_or(0);
        let data = buf.get(..n).unwrap_or_default().to_vec();
        // Queued under the lock: frames of one stream go out in the order they were written.
        self.send(Frame::new(self.id, Kind::Data, data));
        drop(inner);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.cell.inner);
        if !inner.tx_eof && !inner.broken {
            inner.tx_eof = true;
            self.send(Frame::empty(self.id, Kind::Eof));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let broken = {
            let mut inner = lock(&self.cell.inner);
            std::mem::replace(&mut inner.broken, true)
        };
        if !broken {
            self.send(Frame::empty(self.id, Kind::Close));
        }
        let mut state = lock(&self.shared.state);
        if state
            .streams
            .get(&self.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            state.streams.remove(&self.id);
        }
        state.opening.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A host and a guest session over an in-memory channel.
    fn pair() -> (Session, Session, mpsc::Receiver<(u32, MuxStream)>) {
        let (h, g) = tokio::io::duplex(16 * 1024);
        let (hr, hw) = tokio::io::split(h);
        let (gr, gw) = tokio::io::split(g);
        let host = Session::host(hr, hw);
        let (guest, accepted) = Session::guest(gr, gw, vec![1024]);
        (host, guest, accepted)
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn test_streams_carry_bytes_both_ways_past_the_window_and_end() {
        let (host, _guest, mut accepted) = pair();
        let mut a = within(host.open(1024)).await.unwrap();
        let (port, mut b) = within(accepted.recv()).await.unwrap();
        assert_eq!(port, 1024);
        let big: Vec<u8> = (0..3 * WINDOW as usize)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        within(b.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, big);
        b.write_all(b"echo").await.unwrap();
        drop(b);
        assert_eq!(within(writer).await.unwrap(), b"echo");
    }

    #[tokio::test]
    async fn test_unknown_port_refused_and_closed_stream_breaks_writes() {
        let (host, _guest, mut accepted) = pair();
        let err = within(host.open(9)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let mut a = within(host.open(1024)).await.unwrap();
        let (_, b) = within(accepted.recv()).await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        within(a.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        let err = a.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn test_quiesce_breaks_streams_and_stops_opens() {
        let (host, _guest, mut accepted) = pair();
        let _a = within(host.open(1024)).await.unwrap();
        let (_, mut b) = within(accepted.recv()).await.unwrap();
        within(host.quiesce()).await.unwrap();
        assert!(b.write_all(b"x").await.is_err());
        assert!(within(host.open(1024)).await.is_err());
    }

    /// Reads frames from a raw host end until one of `kind` for `stream`.
    async fn expect<R: AsyncRead + Unpin>(rd: &mut R, d: &mut Decoder, stream: u32, kind: Kind) {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = d.next_frame().unwrap() {
                if f.stream == stream && f.kind == kind {
                    return;
                }
                assert!(f.kind == Kind::Credit || f.kind == Kind::Close, "{f:?}");
            }
            let n = within(rd.read(&mut buf)).await.unwrap();
            assert!(n > 0, "channel closed waiting for {kind:?}");
            d.push(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn test_guest_quiet_after_quiesce_until_a_new_host_says_hello() {
        // The guest's channel outlives the host side, as a restored VM's port does.
        let (h, g) = tokio::io::duplex(16 * 1024);
        let (mut hr, mut hw) = tokio::io::split(h);
        let (gr, gw) = tokio::io::split(g);
        let (_guest, mut accepted) = Session::guest(gr, gw, vec![1024]);
        let mut d = Decoder::default();
        let mut send = Vec::new();
        for f in [
            Frame::empty(0, Kind::Hello),
            Frame::number(1, Kind::Open, 1024),
        ] {
            f.encode_into(&mut send);
        }
        hw.write_all(&send).await.unwrap();
        expect(&mut hr, &mut d, 1, Kind::Opened).await;
        let (_, mut b) = within(accepted.recv()).await.unwrap();
        send.clear();
        Frame::empty(0, Kind::Quiesce).encode_into(&mut send);
        Frame::number(2, Kind::Open, 1024).encode_into(&mut send);
        hw.write_all(&send).await.unwrap();
        expect(&mut hr, &mut d, 0, Kind::Quiesced).await;
        expect(&mut hr, &mut d, 2, Kind::Refused).await;
        assert!(b.write_all(b"x").await.is_err());
        send.clear();
        Frame::empty(0, Kind::Hello).encode_into(&mut send);
        Frame::number(1, Kind::Open, 1024).encode_into(&mut send);
        Frame::new(1, Kind::Data, b"again".to_vec()).encode_into(&mut send);
        hw.write_all(&send).await.unwrap();
        expect(&mut hr, &mut d, 1, Kind::Opened).await;
        let (_, mut b) = within(accepted.recv()).await.unwrap();
        let mut got = [0u8; 5];
        within(b.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"again");
    }

    #[tokio::test]
    async fn test_peer_past_its_credit_ends_the_session() {
        let (h, g) = tokio::io::duplex(1 << 20);
        let (hr, mut hw) = tokio::io::split(h);
        let (gr, gw) = tokio::io::split(g);
        let (guest, mut accepted) = Session::guest(gr, gw, vec![1024]);
        let mut wire = Vec::new();
        Frame::number(1, Kind::Open, 1024).encode_into(&mut wire);
        for _ in 0..(WINDOW as usize / MAX_DATA + 1) {
            Frame::new(1, Kind::Data, vec![0; MAX_DATA]).encode_into(&mut wire);
        }
        hw.write_all(&wire).await.unwrap();
        let (_, mut b) = within(accepted.recv()).await.unwrap();
        let why = within(guest.ended()).await;
        assert!(why.contains("credit"), "{why}");
        let mut all = Vec::new();
        within(b.read_to_end(&mut all)).await.unwrap();
        drop(hr);
    }
}
