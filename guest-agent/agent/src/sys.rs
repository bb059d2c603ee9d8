//! The agent's only unsafe code: the kernel calls nix has no safe form for (clone with a
//! callback, the loopback and random-pool ioctls, seccomp(2) with a filter, registering a
//! descriptor with tokio).

use std::ffi::{c_char, c_short, CStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr;

use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

/// Stack of the cloned child until it execs (it only calls dup2 and execve).
const CLONE_STACK_SIZE: usize = 64 * 1024;

/// Starts `/proc/self/exe <mode>` (`container-init`, `exec-init`) as a child in the new
/// namespaces `flags` asks for, with `fds[i]` as its fd `i` (stdin, stdout, stderr, sync
/// socket). The fds must be above 2 (the agent's own stdio is open), so that no dup2
/// overwrites a source still to be duplicated.
///
/// The child waits for one byte on `gate` (a close-on-exec pipe's read end) before it execs:
/// in a new user namespace the parent writes the id maps first, then the child becomes the
/// namespace's root (uid and gid 0 inside) so that the exec keeps its capabilities there (an
/// unmapped uid would lose them all).
pub fn spawn_self(
    mode: &'static CStr,
    fds: [BorrowedFd<'_>; 4],
    gate: BorrowedFd<'_>,
    flags: CloneFlags,
) -> io::Result<Pid> {
    let raw = fds.map(|fd| fd.as_raw_fd());
    let gate = gate.as_raw_fd();
    let user_ns = flags.contains(CloneFlags::CLONE_NEWUSER);
    if raw.iter().any(|&fd| fd <= 2) {
        return Err(io::Error::other("container fds must be above 2"));
    }
    let exe = c"/proc/self/exe";
    let argv: [*const c_char; 3] = [exe.as_ptr(), mode.as_ptr(), ptr::null()];
    let envp: [*const c_char; 1] = [ptr::null()];
    let mut stack = vec![0u8; CLONE_STACK_SIZE];
    let child = Box::new(move || -> isize {
        // Between clone and execve the child runs only async-signal-safe calls.
        let mut byte = 0u8;
        // SAFETY: read(2) of one byte into a live local from an fd this process owns.
        if unsafe { libc::read(gate, (&mut byte as *mut u8).cast(), 1) } != 1 {
            return 125;
        }
        if user_ns {
            // Raw syscalls: glibc's wrappers would signal the parent's other threads.
            for nr in [libc::SYS_setresgid, libc::SYS_setresuid] {
                // SAFETY: setresgid/setresuid with ids, no memory involved.
                if unsafe { libc::syscall(nr, 0, 0, 0) } != 0 {
                    return 124;
                }
            }
        }
        for (target, fd) in (0..).zip(raw) {
            // SAFETY: dup2/fcntl on fds this process owns; no memory is touched. dup2 onto
            // itself keeps close-on-exec, so that case clears the flag instead.
            let ok = unsafe {
                match fd == target {
                    true => libc::fcntl(fd, libc::F_SETFD, 0),
                    false => libc::dup2(fd, target),
                }
            };
            if ok < 0 {
                return 126;
            }
        }
        // SAFETY: `argv` and `envp` are null-terminated arrays of pointers to NUL-terminated
        // strings, all alive in this (copied) address space for the duration of the call.
        unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        127
    });
    // SAFETY: no CLONE_VM, so the child runs on its own copy of the address space and of
    // `stack`; the callback above only makes raw syscalls (read, setres[ug]id, dup2, fcntl,
    // execve) before the exec replaces the image, so no lock held by another thread can be
    // taken in the child.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }?;
    Ok(pid)
}

/// Brings the loopback interface of the calling process's network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut name = [0 as c_char; libc::IFNAMSIZ];
    for (dst, src) in name.iter_mut().zip(b"lo") {
        *dst = *src as c_char;
    }
    let mut req = libc::ifreq {
        ifr_name: name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a valid, owned `ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `ifru_flags` (the union member SIOCGIFFLAGS defines).
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = c_short::try_from(libc::IFF_UP).map_err(io::Error::other)?;
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads a valid, owned `ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new terminal from the `/dev/ptmx` of the calling process's root (a container's own
/// devpts): (master, slave), both close-on-exec.
pub fn open_terminal() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)?;
    Ok((master.into(), slave.into()))
}

/// Sends `fd` over the sync socket (SCM_RIGHTS, with one byte).
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    sendmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &[io::IoSlice::new(b"T")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one fd sent with [`send_fd`]; `WouldBlock` when nothing is there yet.
pub fn recv_fd(socket: BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                use std::os::fd::FromRawFd;
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing else owns it.
                return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::other("no terminal fd on the sync socket"))
}

/// Makes `cmd`'s child the leader of a new session whose controlling terminal is its stdin
/// (a terminal's slave): what a shell needs for job control and Ctrl-C.
pub fn with_controlling_terminal(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid and
    // ioctl, both async-signal-safe, on the child's own fd 0; it touches no shared memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd`'s child enter `root` (chroot, then `/` as its working directory) before it
/// execs, so that the program's path and libraries resolve there.
pub fn with_root(cmd: &mut std::process::Command, root: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let root = std::ffi::CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("root path has a NUL byte"))?;
    // SAFETY: the closure runs in the child between fork and exec and calls only chroot and
    // chdir, both async-signal-safe, on a C string allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) < 0 || libc::chdir(c"/".as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The sync socket the agent put on fd 3 of `container-init`.
pub fn inherited_sync_fd() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: fd 3 of container-init is the sync socket dup2'd there by
    // `spawn_container_init`; nothing else in this process refers to it, so taking ownership
    // once, at startup, is sound.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(3) }
}

/// Installs a seccomp BPF program on the calling thread (seccomp(2)
/// `SECCOMP_SET_MODE_FILTER`, no flags). The kernel requires `no_new_privs` or
/// CAP_SYS_ADMIN; unlike seccompiler's `apply_filter`, this never sets `no_new_privs` itself
/// (the spec decides).
pub fn install_seccomp(program: &[seccompiler::sock_filter]) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|f| libc::sock_filter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect();
    let len = u16::try_from(filter.len())
        .map_err(|_| io::Error::other("seccomp program longer than 65535 instructions"))?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `len` valid instructions in `filter`, both alive for the call;
    // the kernel copies the program and keeps no pointer into our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `RNDADDENTROPY` (include/uapi/linux/random.h): `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's input pool crediting 8 bits per byte (`RNDADDENTROPY` on
/// `random`, an open `/dev/random` or `/dev/urandom`), then makes the CRNG reseed from the pool
/// at once (`RNDRESEEDCRNG`): what the kernel hands out afterwards depends on `seed`, even in a
/// guest resumed from a snapshot with another guest's random state.
pub fn add_entropy_and_reseed(random: BorrowedFd<'_>, seed: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, as u32 words.
    let len = u32::try_from(seed.len()).map_err(|_| io::Error::other("seed too long"))?;
    let bits = len
        .checked_mul(8)
        .ok_or_else(|| io::Error::other("seed too long"))?;
    let mut info: Vec<u32> = vec![bits, len];
    info.extend(seed.chunks(4).map(|c| {
        let mut word = [0u8; 4];
        word[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(word)
    }));
    // SAFETY: `info` is a live rand_pool_info whose buf holds at least `buf_size` bytes (the
    // seed rounded up to whole words); the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    match unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// personality(2): this process's execution domain (`PER_LINUX` 0, `PER_LINUX32` 8).
pub fn set_personality(persona: libc::c_ulong) -> io::Result<()> {
    // SAFETY: personality(2) takes a plain integer and touches no memory of ours.
    match unsafe { libc::personality(persona) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// mount_setattr(2) on the mount at `at` and every mount below it (`AT_RECURSIVE`):
/// `MOUNT_ATTR_*` bits to set and to clear.
pub fn mount_setattr_recursive(at: BorrowedFd<'_>, set: u64, clear: u64) -> io::Result<()> {
    /// `struct mount_attr` (include/uapi/linux/mount.h, MOUNT_ATTR_SIZE_VER0).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let flags = AT_RECURSIVE | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: `at` is an open descriptor, the path an empty NUL-terminated literal and `attr` a
    // live `struct mount_attr` whose size is passed with it; the kernel keeps no pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            at.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `fd` registered with tokio's reactor (the serial channel's port, [`crate::channel`]).
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the OwnedFd is moved in, so it stays open, and is closed by nobody else, for as
    // long as the AsyncFd that owns it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// What [`zero_free_memory`] leaves free.
const ZERO_RESERVE_KIB: u64 = 16 << 10;
/// What [`zero_free_memory`] takes at a time.
const ZERO_CHUNK: usize = 4 << 20;
/// The most [`zero_free_memory`] takes: the pages freed last are handed out first, and what the
/// boot freed last (the initramfs image, the kernel's init code) is what it is after; all of a
/// large VM's memory would be as many pages for the VM being saved to write.
const ZERO_LIMIT: usize = 64 << 20;

/// Takes the guest's free memory, chunk by chunk while more than [`ZERO_RESERVE_KIB`] is free
/// and up to [`ZERO_LIMIT`], so that the kernel zeroes every page it hands out, then gives it
/// all back: freed pages that still held what the boot left in them (the initramfs image, the
/// kernel's init code) are all zeros afterwards, and a snapshot leaves them out. Returns the
/// bytes taken.
pub fn zero_free_memory() -> io::Result<u64> {
    let mut taken: Vec<*mut libc::c_void> = Vec::new();
    let result = loop {
        match mem_free_kib() {
            _ if taken.len() * ZERO_CHUNK >= ZERO_LIMIT => break Ok(()),
            Ok(free) if free > ZERO_RESERVE_KIB + (ZERO_CHUNK as u64 >> 10) => {}
            Ok(_) => break Ok(()),
            Err(e) => break Err(e),
        }
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let chunk = unsafe {
            libc::mmap(
                ptr::null_mut(),
                ZERO_CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if chunk == libc::MAP_FAILED {
            break Err(io::Error::last_os_error());
        }
        taken.push(chunk);
        // SAFETY: `chunk` is the mapping of ZERO_CHUNK bytes made above; populating it writes
        // nothing but the kernel's zeros.
        if unsafe { libc::madvise(chunk, ZERO_CHUNK, libc::MADV_POPULATE_WRITE) } != 0 {
            break Err(io::Error::last_os_error());
        }
    };
    let bytes = taken.len() as u64 * ZERO_CHUNK as u64;
    for chunk in taken {
        // SAFETY: each is a mapping of ZERO_CHUNK bytes made above, unmapped once; no reference
        // into it exists.
        unsafe { libc::munmap(chunk, ZERO_CHUNK) };
    }
    result.map(|()| bytes)
}

/// `MemFree` of `/proc/meminfo`, in KiB.
fn mem_free_kib() -> io::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other("no MemFree in /proc/meminfo"))
}
