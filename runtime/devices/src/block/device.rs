//! The block device: serves the request queue from a raw backing file.
//!
//! Transport-independent: a transport owns the queue and guest memory, calls
//! [`Block::process_queue`] on every kick and signals the guest when it reports used buffers.
//! Data moves through a bounce buffer with `pread`/`pwrite` at the request's offset (the file is
//! never mapped, so a guest cannot make the VMM fault on a truncated file); `FLUSH` is
//! `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::GuestMemory;

use super::defs::*;
use super::metrics::METRICS;
use super::request::{parse, Request, RequestError};
use super::BlockError;
use crate::queue::{log_broken, pop, QueueFault};
use crate::rate_limited::{debug_rate_limited, warn_rate_limited};

/// Size of the bounce buffer between guest memory and the file: one `pread`/`pwrite` per this
/// many bytes of a request.
const BOUNCE_LEN: usize = 128 * 1024;
/// Size of the part of `struct virtio_blk_config` we fill: `capacity`, `size_max`, `seg_max`.
pub(crate) const CONFIG_LEN: usize = 16;

/// A virtio-blk device on an open backing file.
#[derive(Debug)]
pub(crate) struct Block {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    /// What `GET_ID` returns: the serial, NUL-padded.
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
    /// The guest corrupted the queue: nothing is served until the driver resets the device.
    broken: bool,
}

/// What one [`Block::process_queue`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Served {
    /// The used ring changed.
    pub(crate) used: bool,
    /// The queue was found corrupted in this call: the transport reports `DEVICE_NEEDS_RESET`.
    pub(crate) broke: bool,
    /// The call stopped at its budget with requests left: the transport calls again soon.
    pub(crate) more: bool,
}

impl Block {
    /// Opens `path` (read-write unless `read_only`); the capacity is its size in whole sectors,
    /// `serial` (at most 20 bytes) what `GET_ID` answers.
    ///
    /// # Errors
    /// The serial is too long, the file cannot be opened or sized, or is neither a regular file
    /// nor a block device.
    pub(crate) fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_BYTES];
        id.get_mut(..serial.len())
            .ok_or_else(|| BlockError::Serial {
                serial: serial.to_owned(),
            })?
            .copy_from_slice(serial.as_bytes());
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size_error = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        let file_type = file.metadata().map_err(size_error)?.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlockError::NotAFile {
                path: path.to_owned(),
            });
        }
        // Seeking to the end sizes block devices too (their metadata length is 0).
        let size = file.seek(SeekFrom::End(0)).map_err(size_error)?;
        let tail = size % SECTOR_SIZE;
        if tail != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                ignored_bytes = tail,
                "block: backing file size is not a multiple of 512; the tail is not visible"
            );
        }
        Ok(Self {
            file,
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
            id,
            bounce: vec![0; BOUNCE_LEN],
            broken: false,
        })
    }

    /// Offered feature bits.
    pub(crate) fn features(&self) -> u64 {
        let features = F_VERSION_1 | F_FLUSH | F_SEG_MAX;
        match self.read_only {
            true => features | F_RO,
            false => features,
        }
    }

    /// The start of `struct virtio_blk_config` (virtio 1.2 §5.2.4), little-endian:
    /// `capacity`, `size_max` (0: not offered), `seg_max`.
    pub(crate) fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let (capacity, rest) = config.split_at_mut(8);
        capacity.copy_from_slice(&self.capacity_sectors.to_le_bytes());
        let (_size_max, seg_max) = rest.split_at_mut(4);
        seg_max.copy_from_slice(&SEG_MAX.to_le_bytes());
        config
    }

    /// Serves the available requests, at most [`QUEUE_SIZE`] per call; nothing once the queue
    /// was found corrupted (until [`Block::reset`]).
    pub(crate) fn process_queue<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> Served {
        let mut served = Served::default();
        if self.broken {
            return served;
        }
        let mut budget = usize::from(QUEUE_SIZE);
        if let Err(fault) = self.serve(mem, queue, &mut budget, &mut served.used) {
            self.broken = true;
            METRICS.queues_broken.inc();
            log_broken("block", "request", &fault);
            served.broke = true;
        }
        served.more = budget == 0 && !self.broken;
        served
    }

    /// Device reset: a broken queue is served again.
    pub(crate) fn reset(&mut self) {
        self.broken = false;
    }

    fn serve<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        budget: &mut usize,
        used: &mut bool,
    ) -> Result<(), QueueFault> {
        loop {
            queue.disable_notification(mem).map_err(QueueFault::Ring)?;
            while *budget > 0 {
                let Some(chain) = pop(queue, mem)? else {
                    break;
                };
                *budget -= 1;
                let head = chain.head_index();
                let len = self.handle_chain(mem, chain);
                queue.add_used(mem, head, len).map_err(QueueFault::Ring)?;
                *used = true;
            }
            if *budget == 0 || !queue.enable_notification(mem).map_err(QueueFault::Ring)? {
                return Ok(());
            }
        }
    }

    /// Runs one request; returns the used length.
    fn handle_chain<'a, M: GuestMemory>(
        &mut self,
        mem: &'a M,
        chain: DescriptorChain<&'a M>,
    ) -> u32 {
        let mut request = match parse(mem, chain) {
            Ok(request) => request,
            Err(e) => {
                METRICS.bad_desc.inc();
                warn_rate_limited!(error = %e, "block: dropping malformed descriptor chain");
                return 0;
            }
        };
        let status = self.execute(&mut request);
        if let Err(e) = request.status.write_all(&[status]) {
            METRICS.io_errors.inc();
            warn_rate_limited!(error = %e, "block: writing the status byte failed");
        }
        request.written()
    }

    /// Runs `request`; returns its status byte.
    fn execute<B: BitmapSlice>(&mut self, request: &mut Request<'_, B>) -> u8 {
        let result = match request.header {
            None => Err(RequestError::ShortHeader {
                len: request.readable_len,
            }),
            Some(header) => match header.request_type {
                T_IN => self.read(header.sector, &mut request.data_out),
                T_OUT => self.write(header.sector, &mut request.data_in),
                T_FLUSH => self.flush(),
                T_GET_ID => get_id(&self.id, &mut request.data_out),
                other => {
                    METRICS.unsupported.inc();
                    debug_rate_limited!(request_type = other, "block: unsupported request type");
                    return S_UNSUPP;
                }
            },
        };
        match result {
            Ok(()) => S_OK,
            Err(e) => {
                count_error(&e);
                warn_rate_limited!(error = %e, "block: request failed");
                S_IOERR
            }
        }
    }

    /// `IN`: fills `dst` from the file at `sector`.
    fn read<B: BitmapSlice>(
        &mut self,
        sector: u64,
        dst: &mut Writer<'_, B>,
    ) -> Result<(), RequestError> {
        let len = dst.available_bytes();
        let mut offset = self.byte_offset(sector, len)?;
        let mut remaining = len;
        while remaining > 0 {
            let chunk = prefix(&mut self.bounce, remaining);
            self.file
                .read_exact_at(chunk, offset)
                .map_err(RequestError::File)?;
            dst.write_all(chunk).map_err(RequestError::GuestMemory)?;
            offset = offset.saturating_add(chunk.len() as u64);
            remaining = remaining.saturating_sub(chunk.len());
        }
        METRICS.reads.inc();
        METRICS.read_bytes.add(len as u64);
        Ok(())
    }

    /// `OUT`: writes all of `src` to the file at `sector`.
    fn write<B: BitmapSlice>(
        &mut self,
        sector: u64,
        src: &mut Reader<'_, B>,
    ) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let len = src.available_bytes();
        let mut offset = self.byte_offset(sector, len)?;
        let mut remaining = len;
        while remaining > 0 {
            let chunk = prefix(&mut self.bounce, remaining);
            src.read_exact(chunk).map_err(RequestError::GuestMemory)?;
            self.file
                .write_all_at(chunk, offset)
                .map_err(RequestError::File)?;
            offset = offset.saturating_add(chunk.len() as u64);
            remaining = remaining.saturating_sub(chunk.len());
        }
        METRICS.writes.inc();
        METRICS.write_bytes.add(len as u64);
        Ok(())
    }

    /// `FLUSH`: makes completed writes durable (nothing to do on a read-only disk).
    fn flush(&mut self) -> Result<(), RequestError> {
        if !self.read_only {
            self.file.sync_data().map_err(RequestError::File)?;
        }
        METRICS.flushes.inc();
        Ok(())
    }

    /// The file offset of `len` bytes at `sector`, if they are whole sectors within the capacity.
    fn byte_offset(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let out_of_range = || RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity_sectors,
        };
        let len_u64 = u64::try_from(len).map_err(|_| out_of_range())?;
        if len_u64 % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned { len });
        }
        let end_sector = sector
            .checked_add(len_u64 / SECTOR_SIZE)
            .ok_or_else(out_of_range)?;
        if end_sector > self.capacity_sectors {
            return Err(out_of_range());
        }
        // Cannot overflow: `sector <= capacity_sectors = file size / SECTOR_SIZE`.
        sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)
    }
}

/// `GET_ID`: the serial, NUL-padded to 20 bytes, truncated to the buffer the driver gave.
fn get_id<B: BitmapSlice>(
    id: &[u8; ID_BYTES],
    dst: &mut Writer<'_, B>,
) -> Result<(), RequestError> {
    let mut id = *id;
    let len = dst.available_bytes().min(ID_BYTES);
    dst.write_all(prefix(&mut id, len))
        .map_err(RequestError::GuestMemory)?;
    METRICS.get_ids.inc();
    Ok(())
}

/// The first `len` bytes of `buf`, or all of it when it is shorter.
fn prefix(buf: &mut [u8], len: usize) -> &mut [u8] {
    let len = len.min(buf.len());
    buf.split_at_mut(len).0
}

fn count_error(error: &RequestError) {
    let counter = match error {
        RequestError::ShortHeader { .. } => &METRICS.bad_header,
        RequestError::Unaligned { .. } => &METRICS.unaligned,
        RequestError::OutOfRange { .. } => &METRICS.out_of_range,
        RequestError::ReadOnly => &METRICS.read_only_writes,
        RequestError::Chain(_) | RequestError::NoStatus => &METRICS.bad_desc,
        RequestError::File(_) | RequestError::GuestMemory(_) => &METRICS.io_errors,
    };
    counter.inc();
}

#[cfg(test)]
mod tests {
    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::rate_limited::count_events;

    const MEM_SIZE: usize = 0x40_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const SECTOR: u32 = 512;
    /// Sectors of the test disks.
    const DISK_SECTORS: u8 = 8;
    /// Status byte value before the device wrote one.
    const UNTOUCHED: u8 = 0xff;
    #[allow(clippy::cast_possible_truncation)] // the flag is 2
    const W: u16 = VRING_DESC_F_WRITE as u16;
    #[allow(clippy::cast_possible_truncation)] // the flag is 1
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    #[allow(clippy::cast_possible_truncation)] // the flag is 4
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    /// Byte that fills sector `sector` of a fresh test disk.
    fn fill(sector: u8) -> u8 {
        0xa0 + sector
    }

    /// A disk of `DISK_SECTORS` sectors plus `tail` bytes, sector i filled with `fill(i)`.
    fn disk(tail: usize) -> NamedTempFile {
        let mut file = NamedTempFile::new().unwrap();
        for sector in 0..DISK_SECTORS {
            file.write_all(&[fill(sector); SECTOR as usize]).unwrap();
        }
        file.write_all(&vec![0x55; tail]).unwrap();
        file.flush().unwrap();
        file
    }

    fn open(file: &NamedTempFile, read_only: bool) -> Block {
        Block::open(file.path(), read_only, "husk-blk").unwrap()
    }

    fn guest() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        mem
    }

    fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        mem.write_obj(request_type.to_le(), GuestAddress(addr))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The usual three-descriptor request: header, data (`data_flags`), status.
    fn request(data_len: u32, data_flags: u16) -> Vec<(u64, u32, u16)> {
        vec![(HDR, 16, 0), (DATA, data_len, data_flags), (STATUS, 1, W)]
    }

    /// Queues `chains` of `(addr, len, flags)` descriptors on a fresh queue, runs the device
    /// once and returns the used elements as `(head, len)`.
    fn run(
        dev: &mut Block,
        mem: &GuestMemoryMmap,
        chains: &[Vec<(u64, u32, u16)>],
    ) -> Vec<(u32, u32)> {
        let (vq, mut queue) = queue_with(mem, chains);

        dev.process_queue(mem, &mut queue);

        let used = vq.used().idx().load();
        (0..usize::from(used))
            .map(|i| {
                let elem = vq.used().ring().ref_at(i).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    /// A fresh queue with `chains` of `(addr, len, flags)` descriptors made available.
    fn queue_with<'a>(
        mem: &'a GuestMemoryMmap,
        chains: &[Vec<(u64, u32, u16)>],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let queue: Queue = vq.create_queue().unwrap();
        let mut descs = Vec::new();
        for chain in chains {
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let next = u16::try_from(descs.len() + 1).unwrap();
                let flags = if i + 1 < chain.len() {
                    flags | NEXT
                } else {
                    flags
                };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    addr, len, flags, next,
                )));
            }
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        (vq, queue)
    }

    /// Runs the device on a corrupted queue: it must break in the first call (counted, at
    /// most one log line), then serve nothing, promptly, however often it is called.
    fn assert_breaks(dev: &mut Block, mem: &GuestMemoryMmap, queue: &mut Queue) {
        let broken = METRICS.queues_broken.count();

        let mut first = Served::default();
        let lines = count_events(|| first = dev.process_queue(mem, queue));
        let later = count_events(|| {
            for _ in 0..1000 {
                assert_eq!(dev.process_queue(mem, queue), Served::default());
            }
        });

        assert!(first.broke && !first.more, "{first:?}");
        assert!(METRICS.queues_broken.count() > broken);
        assert!(lines <= 1, "{lines} log lines for one broken queue");
        assert_eq!(later, 0, "a broken device stays silent");
    }

    #[test]
    fn test_block_open_missing_file_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.img");

        let err = Block::open(&path, false, "d").unwrap_err();

        assert!(matches!(err, BlockError::Open { .. }));
        assert_eq!(
            err.to_string(),
            format!("failed to open block backing file {}", path.display())
        );
    }

    #[test]
    fn test_block_open_directory_not_a_file() {
        let dir = tempfile::tempdir().unwrap();

        let err = Block::open(dir.path(), true, "d").unwrap_err();

        assert!(matches!(err, BlockError::NotAFile { path } if path == dir.path()));
    }

    #[test]
    fn test_block_config_partial_sector_capacity_rounds_down() {
        let file = disk(100);

        let config = open(&file, false).config();

        let mut expected = u64::from(DISK_SECTORS).to_le_bytes().to_vec();
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(&SEG_MAX.to_le_bytes());
        assert_eq!(config.to_vec(), expected);
    }

    #[test]
    fn test_block_features_read_only_offers_ro() {
        let file = disk(0);

        let (rw, ro) = (open(&file, false).features(), open(&file, true).features());

        assert_eq!(rw, F_VERSION_1 | F_FLUSH | F_SEG_MAX);
        assert_eq!(ro, rw | F_RO);
    }

    #[test]
    fn test_process_queue_read_sector_returns_file_content() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 3);

        let used = run(&mut dev, &mem, &[request(SECTOR, W)]);

        assert_eq!(used, vec![(0, SECTOR + 1)]);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(
            read_guest(&mem, DATA, SECTOR),
            vec![fill(3); SECTOR as usize]
        );
    }

    #[test]
    fn test_process_queue_read_data_split_across_descriptors_returns_file_content() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 1);
        let chain = vec![
            (HDR, 16, 0),
            (DATA, 300, W),
            (DATA + 0x1000, 2 * SECTOR - 300, W),
            (STATUS, 1, W),
        ];

        let used = run(&mut dev, &mem, &[chain]);

        assert_eq!(used, vec![(0, 2 * SECTOR + 1)]);
        assert_eq!(status(&mem), S_OK);
        let mut data = read_guest(&mem, DATA, 300);
        data.extend(read_guest(&mem, DATA + 0x1000, 2 * SECTOR - 300));
        let mut expected = vec![fill(1); SECTOR as usize];
        expected.extend(vec![fill(2); SECTOR as usize]);
        assert_eq!(data, expected);
    }

    #[test]
    fn test_process_queue_write_then_read_round_trips_on_disk() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        let written: Vec<u8> = (0..SECTOR)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        write_header(&mem, HDR, T_OUT, 5);
        mem.write_slice(&written, GuestAddress(DATA)).unwrap();

        let used = run(&mut dev, &mem, &[request(SECTOR, 0)]);
        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_OK));
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(on_disk.get(5 * 512..6 * 512), Some(written.as_slice()));
        assert_eq!(on_disk.get(4 * 512..5 * 512), Some(&[fill(4); 512][..]));

        mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        write_header(&mem, HDR, T_IN, 5);
        run(&mut dev, &mem, &[request(SECTOR, W)]);
        assert_eq!(read_guest(&mem, DATA, SECTOR), written);
    }

    #[test]
    fn test_process_queue_request_larger_than_bounce_round_trips() {
        let file = NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let mut dev = open(&file, false);
        let mem = guest();
        let len = u32::try_from(BOUNCE_LEN * 2 + 3 * 512).unwrap();
        let written: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        write_header(&mem, HDR, T_OUT, 7);
        mem.write_slice(&written, GuestAddress(DATA)).unwrap();
        run(&mut dev, &mem, &[request(len, 0)]);
        assert_eq!(status(&mem), S_OK);
        mem.write_slice(&vec![0; written.len()], GuestAddress(DATA))
            .unwrap();
        write_header(&mem, HDR, T_IN, 7);

        let used = run(&mut dev, &mem, &[request(len, W)]);

        assert_eq!((used, status(&mem)), (vec![(0, len + 1)], S_OK));
        assert_eq!(read_guest(&mem, DATA, len), written);
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(
            on_disk.get(7 * 512..7 * 512 + written.len()),
            Some(written.as_slice())
        );
    }

    #[test]
    fn test_process_queue_write_header_and_data_in_one_descriptor_ok() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_OUT, 0);
        mem.write_slice(&[0x11; 512], GuestAddress(HDR + 16))
            .unwrap();

        let used = run(
            &mut dev,
            &mem,
            &[vec![(HDR, 16 + SECTOR, 0), (STATUS, 1, W)]],
        );

        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_OK));
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(on_disk.get(..512), Some(&[0x11; 512][..]));
    }

    #[test]
    fn test_process_queue_flush_ok() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_FLUSH, 0);
        let flushes = METRICS.flushes.count();

        let used = run(&mut dev, &mem, &[vec![(HDR, 16, 0), (STATUS, 1, W)]]);

        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_OK));
        assert!(METRICS.flushes.count() > flushes);
    }

    #[test]
    fn test_block_open_serial_over_20_bytes_error() {
        let file = disk(0);
        let err = Block::open(file.path(), true, &"s".repeat(21)).unwrap_err();
        assert!(err.to_string().contains("longer than 20 bytes"), "{err}");
    }

    #[test]
    fn test_process_queue_get_id_returns_serial() {
        let file = disk(0);
        let mut dev = open(&file, true);
        let mem = guest();
        write_header(&mem, HDR, T_GET_ID, 0);
        mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();

        let used = run(&mut dev, &mem, &[request(20, W)]);

        assert_eq!((used, status(&mem)), (vec![(0, 21)], S_OK));
        let mut expected = b"husk-blk".to_vec();
        expected.resize(20, 0);
        assert_eq!(read_guest(&mem, DATA, 20), expected);
    }

    #[test]
    fn test_process_queue_read_past_capacity_ioerr() {
        let file = disk(100);
        let mut dev = open(&file, false);
        let mem = guest();
        // The last whole sector plus the invisible partial one.
        write_header(&mem, HDR, T_IN, u64::from(DISK_SECTORS) - 1);
        let out_of_range = METRICS.out_of_range.count();

        let used = run(&mut dev, &mem, &[request(2 * SECTOR, W)]);

        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_IOERR));
        assert_eq!(read_guest(&mem, DATA, 4), vec![0; 4], "no data written");
        assert!(METRICS.out_of_range.count() > out_of_range);
    }

    #[test]
    fn test_process_queue_sector_overflow_ioerr() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_OUT, u64::MAX);

        run(&mut dev, &mem, &[request(SECTOR, 0)]);

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn test_process_queue_unaligned_length_ioerr() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 0);

        run(&mut dev, &mem, &[request(100, W)]);

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn test_process_queue_write_read_only_ioerr_file_unchanged() {
        let file = disk(0);
        let before = std::fs::read(file.path()).unwrap();
        let mut dev = open(&file, true);
        let mem = guest();
        write_header(&mem, HDR, T_OUT, 0);
        mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();

        let used = run(&mut dev, &mem, &[request(SECTOR, 0)]);

        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_IOERR));
        assert_eq!(std::fs::read(file.path()).unwrap(), before);
    }

    #[test]
    fn test_process_queue_unknown_type_unsupp() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(
            &mem,
            HDR,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD,
            0,
        );

        let used = run(&mut dev, &mem, &[request(16, 0)]);

        assert_eq!((used, status(&mem)), (vec![(0, 1)], S_UNSUPP));
    }

    #[test]
    fn test_process_queue_short_header_ioerr() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 0);

        run(&mut dev, &mem, &[vec![(HDR, 8, 0), (STATUS, 1, W)]]);

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn test_process_queue_malformed_chains_returned_empty_next_request_served() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 2);
        let bad_desc = METRICS.bad_desc.count();
        let chains = [
            vec![(HDR, 16, 0), (DATA, SECTOR, 0)], // no writable status
            vec![(HDR, 16, 0), (STATUS, 0, W)],    // empty status descriptor
            request(SECTOR, W),
        ];

        let used = run(&mut dev, &mem, &chains);

        assert_eq!(used, vec![(0, 0), (2, 0), (4, SECTOR + 1)]);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(
            read_guest(&mem, DATA, SECTOR),
            vec![fill(2); SECTOR as usize]
        );
        assert!(METRICS.bad_desc.count() >= bad_desc + 2);
    }

    #[test]
    fn test_process_queue_avail_idx_past_queue_size_broken_until_reset() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 0);
        let (vq, mut queue) = queue_with(&mem, &[request(SECTOR, W)]);
        vq.avail().idx().store(QUEUE_SIZE + 1);

        assert_breaks(&mut dev, &mem, &mut queue);
        assert_eq!(vq.used().idx().load(), 0);
        vq.avail().idx().store(1);
        dev.reset();
        let served = dev.process_queue(&mem, &mut queue);
        assert!(served.used && !served.broke, "{served:?}");
        assert_eq!(status(&mem), S_OK);
    }

    #[test]
    fn test_process_queue_indirect_descriptor_not_offered_broken() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        // A valid request behind an indirect table: never followed.
        write_header(&mem, HDR, T_IN, 0);
        let table = [
            (HDR, 16, NEXT, 1),
            (DATA, SECTOR, W | NEXT, 2),
            (STATUS, 1, W, 0),
        ];
        for (i, (addr, len, flags, next)) in (0u64..).zip(table) {
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(desc, GuestAddress(0x38_0000 + 16 * i))
                .unwrap();
        }
        let (_vq, mut queue) = queue_with(&mem, &[vec![(0x38_0000, 48, INDIRECT)]]);

        assert_breaks(&mut dev, &mem, &mut queue);
        assert_eq!(status(&mem), UNTOUCHED);
    }

    #[test]
    fn test_process_queue_buffer_outside_memory_broken() {
        let file = disk(0);
        let mut dev = open(&file, false);
        let mem = guest();
        write_header(&mem, HDR, T_IN, 0);
        let chain = vec![
            (HDR, 16, 0),
            (MEM_SIZE as u64 - 16, SECTOR, W),
            (STATUS, 1, W),
        ];
        let (_vq, mut queue) = queue_with(&mem, &[chain]);

        assert_breaks(&mut dev, &mem, &mut queue);
        assert_eq!(status(&mem), UNTOUCHED);
    }
}
