//! The tap descriptor the device reads and writes frames on. The jail opens it in the engine's
//! network namespace (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and hands it to husk-vmm as a
//! numbered descriptor; here it is checked to be that, and set up for the device's framing.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::defs::HEADER_LEN;
use super::NetError;

/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// Takes descriptor `fd` (inherited from the jail) as the device's tap: it must be a tap with
/// a virtio header and no packet information; its header becomes `virtio_net_hdr_v1`'s 12
/// bytes, every offload is turned off (frames come whole and checksummed) and it is made
/// non-blocking.
///
/// # Errors
/// [`NetError::Tap`]: `fd` is not open, not a tap, has no virtio header, or an ioctl failed.
pub(crate) fn adopt(fd: RawFd) -> Result<File, NetError> {
    let err = |what, source| NetError::Tap { fd, what, source };
    // SAFETY: F_GETFD on any integer only reads the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(err("not open", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process for the device
    // alone: nothing else in the process owns or closes it.
    let tap = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes on x86_64), which `ifr` is.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNGETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(err(
            "not a tap (TUNGETIFF)",
            std::io::Error::last_os_error(),
        ));
    }
    let flags = i32::from(u16::from_ne_bytes([ifr[16], ifr[17]]));
    let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if flags & (wanted | libc::IFF_TUN) != wanted {
        return Err(err(
            "not a tap with a virtio header and no packet information",
            std::io::Error::other(format!("flags {flags:#x}")),
        ));
    }
    let header_len = libc::c_int::try_from(HEADER_LEN).unwrap_or(12);
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, a live local.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ, &header_len) } < 0 {
        return Err(err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes its flags as the argument itself.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
    }
    set_nonblocking(&tap).map_err(|e| err("O_NONBLOCK", e))?;
    Ok(tap)
}

/// A datagram socket pair standing in for a tap (tests and fuzzing; one frame per datagram,
/// as a tap reads and writes them): the device's end, non-blocking, and the host network's.
///
/// # Errors
/// The pair cannot be made.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn socket_tap() -> std::io::Result<(File, std::os::unix::net::UnixDatagram)> {
    let (tap, wire) = std::os::unix::net::UnixDatagram::pair()?;
    tap.set_nonblocking(true)?;
    Ok((File::from(OwnedFd::from(tap)), wire))
}

/// Sets `O_NONBLOCK` on `file`.
fn set_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an open descriptor `file` owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with integer flags on the same descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn test_adopt_refuses_closed_and_non_tap_descriptors() {
        assert!(matches!(
            adopt(-1),
            Err(NetError::Tap {
                what: "not open",
                ..
            })
        ));
        let file = tempfile::tempfile().unwrap();
        let fd = file.into_raw_fd();
        let err = adopt(fd).unwrap_err();
        assert!(err.to_string().contains("not a tap"), "{err}");
    }
}
