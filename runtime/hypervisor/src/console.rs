//! Bounded files that another process writes: QEMU's serial console (`-chardev file` with
//! `append=on`) and the helpers' logs (QEMU's and virtiofsd's stderr, which a guest can fill
//! with per-request errors). They live in the run directory, in `/run`: host RAM. The guest,
//! kernel included, is hostile and may write without end.
//!
//! [`ConsoleCap`] watches such files from a thread of its own and, when one grows past its cap,
//! moves the file's last half to its start and cuts the rest off: the newest output, what an
//! error report quotes, is always kept. The writers must append (`O_APPEND`): after the cut
//! their next write lands at the new end, not past a hole. No pipe is involved: a writer never
//! waits on us (a pipe read by the host once stalled QEMU's serial output for good under a
//! flood).
//!
//! Each file is opened once, without following a symlink, and must be a regular file; the
//! work is then done on that descriptor. A poll every [`POLL`] is one `fstat` per file. Between
//! two polls a writer may go past the cap by what it writes in [`POLL`]; output appended while
//! the tail is moved is moved with it, except what lands between the last check and the cut
//! (microseconds, and only under a flood).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};

pub use husk_vmm::console::CONSOLE_CAP;

/// How often the watched files' sizes are checked.
pub const POLL: Duration = Duration::from_millis(50);

/// Size of the buffer a tail is moved through.
const COPY_CHUNK: usize = 64 * 1024;
/// How many times a tail move catches up with a writer before cutting anyway.
const CATCH_UP_ROUNDS: u32 = 8;

/// Keeps files written by other processes at most about `cap` bytes while it lives; dropping
/// it stops the watch (the files stay).
#[derive(Debug)]
pub struct ConsoleCap {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleCap {
    /// Watches `paths`, each capped at `cap` bytes. A file that does not exist yet (its writer
    /// is starting) is opened when it appears; a symlink or a non-regular file there is never
    /// touched (a warning says so).
    pub fn start(paths: &[PathBuf], cap: u64) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let mut files: Vec<Watched> = paths.iter().cloned().map(Watched::Waiting).collect();
        let spawned = std::thread::Builder::new()
            .name("husk-console-cap".into())
            .spawn(move || {
                // Ends when the sender is dropped (or sends).
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
                    for file in &mut files {
                        file.tick(cap);
                    }
                }
            });
        let thread = spawned
            .inspect_err(|e| warn!(error = %e, "cannot start the console cap: logs unbounded"))
            .ok();
        Self {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for ConsoleCap {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One watched file.
enum Watched {
    /// Not created yet.
    Waiting(PathBuf),
    /// Open for reading and writing.
    Open(PathBuf, File),
    /// Refused or failed: left alone.
    Done,
}

impl Watched {
    fn tick(&mut self, cap: u64) {
        match std::mem::replace(self, Self::Done) {
            Self::Waiting(path) => *self = Self::open(path),
            Self::Open(path, file) => match cap_file(&file, cap) {
                Ok(()) => *self = Self::Open(path, file),
                Err(e) => warn!(path = %path.display(), error = %e, "cannot cap file"),
            },
            Self::Done => {}
        }
    }

    fn open(path: PathBuf) -> Self {
        match open_regular(&path, true) {
            Ok(file) => Self::Open(path, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::Waiting(path),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "not capping file");
                Self::Done
            }
        }
    }
}

/// Opens `path` for reading (and writing when `write`), never through a symlink, never
/// blocking, a regular file only ([`husk_vmm::console::open_regular`]).
///
/// # Errors
/// As [`husk_vmm::console::open_regular`].
pub fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    husk_vmm::console::open_regular(std::fs::OpenOptions::new().read(true).write(write), path)
}

/// Creates (or truncates) the log `path` for a helper's stdout and stderr: mode 0600, append
/// mode (so that [`ConsoleCap`] can cut it), never through a symlink.
///
/// # Errors
/// As [`husk_vmm::console::open_regular`].
pub fn create_log(path: &Path) -> io::Result<File> {
    let file = husk_vmm::console::open_regular(
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600),
        path,
    )?;
    file.set_len(0)?;
    Ok(file)
}

/// When `file` is past `cap`, keeps its last `cap / 2` bytes (see the module's doc).
fn cap_file(file: &File, cap: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len <= cap {
        return Ok(());
    }
    let kept = keep_tail(file, len, cap / 2)?;
    debug!(from = len, to = kept, "console file cut to its tail");
    Ok(())
}

/// Moves bytes `[len - keep, len)` of `file` to its start, then what a writer appended
/// meanwhile after them, and cuts the file there. Returns the new length.
fn keep_tail(file: &File, len: u64, keep: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut from = len.saturating_sub(keep);
    let mut end = len;
    let mut to = 0u64;
    for _ in 0..CATCH_UP_ROUNDS {
        to = copy_range(file, &mut buf, from, end, to)?;
        let now = file.metadata()?.len();
        if now <= end {
            break;
        }
        (from, end) = (end, now);
    }
    file.set_len(to)?;
    Ok(to)
}

/// Copies bytes `[from, end)` of `file` to offset `to` (`to <= from`); returns where the copy
/// ended.
fn copy_range(
    file: &File,
    buf: &mut [u8],
    mut from: u64,
    end: u64,
    mut to: u64,
) -> io::Result<u64> {
    while from < end {
        let want = usize::try_from(end - from)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let chunk = buf.get_mut(..want).unwrap_or_default();
        let n = file.read_at(chunk, from)?;
        if n == 0 {
            break;
        }
        file.write_all_at(chunk.get(..n).unwrap_or_default(), to)?;
        from += n as u64;
        to += n as u64;
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use super::*;

    /// Waits until `cond` holds (or panics after 5 s).
    fn eventually(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn test_console_cap_appending_writer_kept_under_cap_with_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let _cap = ConsoleCap::start(std::slice::from_ref(&path), 4096);
        let mut writer = create_log(&path).unwrap();
        let mut max = 0;
        for i in 0..2000u32 {
            writeln!(writer, "line {i:05}").unwrap();
            if i % 100 == 0 {
                std::thread::sleep(POLL);
                max = max.max(std::fs::metadata(&path).unwrap().len());
            }
        }
        eventually(|| std::fs::metadata(&path).unwrap().len() <= 4096);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line 01999\n"), "{text:?}");
        assert!(!text.contains('\0'), "no hole: the writer appends");
        assert!(max <= 4096 + 100 * 11, "max {max}");
    }

    #[test]
    fn test_console_cap_symlink_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let big = vec![b'x'; 10_000];
        std::fs::write(&target, &big).unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let cap = ConsoleCap::start(&[link], 100);
        std::thread::sleep(POLL * 4);
        drop(cap);
        assert_eq!(std::fs::read(&target).unwrap(), big);
    }

    #[test]
    fn test_console_cap_file_created_later_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.log");
        let _cap = ConsoleCap::start(std::slice::from_ref(&path), 1000);
        std::thread::sleep(POLL * 2);
        let mut writer = create_log(&path).unwrap();
        writer.write_all(&[b'y'; 5000]).unwrap();
        writer.write_all(b"\nlast\n").unwrap();
        eventually(|| std::fs::metadata(&path).unwrap().len() <= 1000);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("last\n"));
    }

    #[test]
    fn test_keep_tail_moves_last_part_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = open_regular(&path, true).unwrap();
        assert_eq!(keep_tail(&file, 10, 4).unwrap(), 4);
        assert_eq!(std::fs::read(&path).unwrap(), b"6789");
    }

    #[test]
    fn test_open_regular_fifo_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_regular(&path, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
