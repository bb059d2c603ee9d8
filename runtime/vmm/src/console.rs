//! The serial console's host file, bounded: the guest (kernel included) is hostile and may
//! write without end, and the file lives in `/run`, host RAM.
//!
//! [`CappedFile`] never grows past its cap: when a write would take it there, the file's last
//! half is moved to its start and the rest cut off, so the newest output (what an error report
//! quotes) is always in it. Moving the tail costs one copy of half the cap per half cap of
//! output: on average one byte copied per byte written. It only uses `pread`, `pwrite` and
//! `ftruncate` on the descriptor it opened, which the VMM's seccomp filter allows.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// How large the serial console's file may grow (1 MiB).
pub const CONSOLE_CAP: u64 = 1 << 20;

/// Size of the buffer the tail is moved through.
const COPY_CHUNK: usize = 64 * 1024;

/// A file written at its end that keeps at most `cap` bytes: its newest output.
#[derive(Debug)]
pub struct CappedFile {
    file: File,
    /// The file's length (only this writer changes it).
    len: u64,
    cap: u64,
}

/// Opens `path` with `options` plus `O_NOFOLLOW | O_NONBLOCK`, and refuses anything but a
/// regular file: a symlink there fails (`ELOOP`), a FIFO or device neither blocks nor is used
/// (`InvalidInput`). For files in directories a jailed VM process can write.
///
/// # Errors
/// The open's or fstat's error, or `InvalidInput`.
pub fn open_regular(options: &mut std::fs::OpenOptions, path: &Path) -> io::Result<std::fs::File> {
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    match file.metadata()?.is_file() {
        true => Ok(file),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        )),
    }
}

impl CappedFile {
    /// Creates (or truncates) `path` with mode 0600, without following a symlink there.
    ///
    /// # Errors
    /// The open's error (`ELOOP` for a symlink at `path`), or `InvalidInput` when `path` is
    /// not a regular file (a FIFO or device there would not be truncated).
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let file = open_regular(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600),
            path,
        )?;
        // Truncated only once known to be a regular file.
        file.set_len(0)?;
        Ok(Self { file, len: 0, cap })
    }

    /// The file's current length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves the last `keep` bytes of the file to its start and cuts the rest.
    fn keep_tail(&mut self, keep: u64) -> io::Result<()> {
        let keep = keep.min(self.len);
        let mut from = self.len - keep;
        let mut to = 0u64;
        let mut buf = vec![0u8; COPY_CHUNK];
        while from < self.len {
            let want = usize::try_from(self.len - from).unwrap_or(usize::MAX);
            let chunk = buf.get_mut(..want.min(COPY_CHUNK)).unwrap_or_default();
            let n = self.file.read_at(chunk, from)?;
            if n == 0 {
                break;
            }
            self.file
                .write_all_at(chunk.get(..n).unwrap_or_default(), to)?;
            from += n as u64;
            to += n as u64;
        }
        self.file.set_len(to)?;
        self.len = to;
        Ok(())
    }
}

impl Write for CappedFile {
    /// Appends `buf`, first making room as the module says. A `buf` of at least half the cap
    /// replaces the file with its own last half.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let half = self.cap / 2;
        let size = buf.len() as u64;
        if size >= half.max(1) {
            let skip = usize::try_from(size - half).unwrap_or(buf.len());
            self.file.set_len(0)?;
            self.len = 0;
            let tail = buf.get(skip..).unwrap_or_default();
            self.file.write_all_at(tail, 0)?;
            self.len = tail.len() as u64;
            return Ok(buf.len());
        }
        if self.len.saturating_add(size) > self.cap {
            self.keep_tail(half.saturating_sub(size))?;
        }
        self.file.write_all_at(buf, self.len)?;
        self.len += size;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn test_capped_file_under_cap_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let mut f = CappedFile::create(&path, 100).unwrap();
        f.write_all(b"hello ").unwrap();
        f.write_all(b"world").unwrap();
        assert_eq!(read(&path), b"hello world");
        assert_eq!(f.len(), 11);
    }

    #[test]
    fn test_capped_file_flood_stays_under_cap_and_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let mut f = CappedFile::create(&path, 1000).unwrap();
        let mut all = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i}\n");
            f.write_all(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        }
        let kept = read(&path);
        assert!(kept.len() >= 500, "{} bytes kept", kept.len());
        assert!(all.ends_with(&kept), "the kept bytes are the newest ones");
    }

    #[test]
    fn test_capped_file_byte_writes_like_serial_keep_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let mut f = CappedFile::create(&path, 64).unwrap();
        let data: Vec<u8> = (0..1000u32)
            .map(|i| b'a' + u8::try_from(i % 26).unwrap())
            .collect();
        for byte in &data {
            f.write_all(std::slice::from_ref(byte)).unwrap();
        }
        let kept = read(&path);
        assert!(kept.len() <= 64 && kept.len() >= 32);
        assert!(data.ends_with(&kept));
    }

    #[test]
    fn test_capped_file_huge_write_keeps_its_last_half() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let mut f = CappedFile::create(&path, 100).unwrap();
        f.write_all(b"old").unwrap();
        let big: Vec<u8> = (0..=255u8).collect();
        assert_eq!(f.write(&big).unwrap(), big.len());
        assert_eq!(read(&path), big.get(206..).unwrap());
    }

    #[test]
    fn test_capped_file_create_truncates_and_refuses_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        std::fs::write(&path, b"stale").unwrap();
        let _f = CappedFile::create(&path, 100).unwrap();
        assert!(read(&path).is_empty());
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(CappedFile::create(&link, 100).is_err());
        assert_eq!(read(&target), b"precious");
    }

    #[test]
    fn test_capped_file_fifo_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = CappedFile::create(&path, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
