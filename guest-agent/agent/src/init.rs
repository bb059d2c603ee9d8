//! What PID 1 does before serving: the guest's own mounts; its identity from the host; and
//! power-off at the end.

use std::io;
use std::path::Path;

use std::os::fd::AsFd;

use husk_protocol::GuestIdentity;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::time::TimeSpec;
use nix::unistd::{chdir, chroot};

/// Where the agent keeps each container's mounts (its rootfs, its shares), one directory per
/// container.
pub const CONTAINERS_DIR: &str = "/run/husk/containers";

/// Mounts /proc, /sys, /dev, /dev/pts, cgroup2, /run and /tmp, and moves the root off the
/// initramfs so that containers can `pivot_root`.
pub fn setup() -> io::Result<()> {
    leave_rootfs()?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    fs_mount("proc", "/proc", "proc", nosuid, None)?;
    fs_mount("sysfs", "/sys", "sysfs", nosuid, None)?;
    fs_mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    fs_mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None,
    )?;
    fs_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None)?;
    fs_mount(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    fs_mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    share_containers_dir()?;
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    Ok(())
}

/// Makes [`CONTAINERS_DIR`] a shared mount: a mount namespace copied from the agent's keeps
/// receiving the mounts the agent makes there later (a spare container-init's, made before
/// its rootfs is mounted, [`crate::container`]), until it makes its own mounts private, as
/// container-init does first.
fn share_containers_dir() -> io::Result<()> {
    let dir = Path::new(CONTAINERS_DIR);
    mkdir_p(dir)?;
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| ctx(e, "bind the containers directory"))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| ctx(e, "share the containers directory"))
}

/// The initramfs root (`rootfs`) cannot be pivoted away from. Bind it onto /newroot, move that
/// mount over `/` and chroot into it (as switch_root does): the root is then an ordinary mount,
/// and a container's mount namespace can `pivot_root` out of it.
fn leave_rootfs() -> io::Result<()> {
    const NEWROOT: &str = "/newroot";
    mkdir_p(Path::new(NEWROOT))?;
    mount(
        Some("/"),
        NEWROOT,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ctx(e, "bind / on /newroot"))?;
    chdir(NEWROOT).map_err(|e| ctx(e, "chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| ctx(e, "move /newroot to /"))?;
    chroot(".").map_err(|e| ctx(e, "chroot"))?;
    chdir("/").map_err(|e| ctx(e, "chdir /"))?;
    Ok(())
}

fn fs_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    mkdir_p(Path::new(target))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(ctx(e, &format!("mount {fstype} on {target}"))),
    }
}

/// `mkdir -p` with mode 0755.
pub fn mkdir_p(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))
}

/// An errno with what was being done.
pub fn ctx(errno: nix::errno::Errno, what: &str) -> io::Error {
    io::Error::new(
        io::Error::from(errno).kind(),
        format!("{what}: {}", errno.desc()),
    )
}

/// Applies the host's part of the guest's identity ([`GuestIdentity`]): its seed into the
/// random pool with a reseed, and its time as `CLOCK_REALTIME`.
pub fn set_identity(identity: &GuestIdentity) -> io::Result<()> {
    let random = std::fs::File::options().write(true).open("/dev/urandom")?;
    crate::sys::add_entropy_and_reseed(random.as_fd(), &identity.seed)?;
    let now = TimeSpec::from_duration(std::time::Duration::from_nanos(identity.realtime_ns));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .map_err(|e| ctx(e, "clock_settime"))
}

/// Flushes the page cache and resets the VM; the VMM treats the reset as the end of the VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on error (e.g. not PID 1 in tests): nothing more to do.
    std::process::exit(1)
}
