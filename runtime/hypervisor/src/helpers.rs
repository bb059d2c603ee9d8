//! Host helper processes shared by the doors: locating programs, running virtiofsd.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::task::Poll;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use tokio::process::{Child, Command};

use crate::console::{ConsoleCap, CONSOLE_CAP};
use crate::error::HelperExited;
use crate::share::ShareMounts;
use crate::{sys, Export, FsShare, HypervisorError, VmExit};

/// Finds an executable by name in `PATH` (only there: what runs is what the user's PATH says).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Spawns `cmd` tied to our lifetime, its stdout and stderr appended to `log` (created afresh,
/// in append mode so that a [`ConsoleCap`] can bound it), inheriting descriptors 3 to
/// 3 + `kept` - 1 (mapped there for it) and no other.
pub(crate) fn spawn_logged(
    program: &'static str,
    cmd: &mut Command,
    log: &Path,
    kept: u32,
) -> Result<Child, HypervisorError> {
    let spawn_err = |source| HypervisorError::Spawn { program, source };
    let out = crate::console::create_log(log).map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    // A process group of its own: a terminal's Ctrl-C (or `timeout`) signals husk's group, and
    // husk, not the VMM, decides what a signal means for the container.
    cmd.process_group(0);
    sys::kill_with_parent(cmd, kept);
    cmd.spawn().map_err(spawn_err)
}

/// Waits until `child` created the socket `path`, failing early if the child exits.
pub(crate) async fn wait_for_socket(
    program: &'static str,
    child: &mut Child,
    path: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            let detail = crate::tail_lines(log, 3).join(" | ");
            return Err(HypervisorError::HelperDied { program, detail });
        }
        if Instant::now() >= deadline {
            return Err(HypervisorError::HelperTimeout {
                program,
                path: path.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The descriptor virtiofsd gets its listening socket at.
const LISTENER_FD: i32 = 3;

/// A running virtiofsd serving one share.
#[derive(Debug)]
pub(crate) struct Virtiofsd {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    log: PathBuf,
    /// Keeps `log` bounded: virtiofsd logs per-request errors, which the guest can cause.
    _log_cap: ConsoleCap,
    /// An entries share's staging directory, removed at stop.
    staging: Option<PathBuf>,
}

impl Virtiofsd {
    /// Starts virtiofsd for `share` on a vhost-user socket this process binds at `socket` and
    /// passes to it: the socket listens on return, so the VMM may connect at once (its first
    /// message waits until virtiofsd runs) and nothing waits for virtiofsd's start. One that
    /// fails to start is reported by [`wait_vm`] (and by the doors' [`failed_helper`]). A
    /// read-only or entries share is built in virtiofsd's own mount namespace
    /// ([`ShareMounts`]); an entries share stages in `staging` (outside what a jail may write).
    pub(crate) fn start(
        binary: &Path,
        share: &FsShare,
        socket: &Path,
        staging: &Path,
        log: &Path,
    ) -> Result<Self, HypervisorError> {
        let staging = staging.to_owned();
        let mounts = ShareMounts::prepare(share, &staging)?;
        let staging = matches!(share.export, Export::Entries(_)).then_some(staging);
        let started = || {
            let spawn_err = |source| HypervisorError::Spawn {
                program: "virtiofsd",
                source,
            };
            let _ = std::fs::remove_file(socket);
            let listener = std::os::unix::net::UnixListener::bind(socket).map_err(spawn_err)?;
            std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(spawn_err)?;
            let mut cmd = Command::new(binary);
            // Its command line names its VM's socket, as `--socket-path` did: what serves a
            // VM stays findable (`ps`, a leak check) by the VM's directory.
            cmd.arg0(socket.join("virtiofsd"));
            cmd.arg("--fd")
                .arg(LISTENER_FD.to_string())
                .arg("--shared-dir")
                .arg(mounts.exported())
                // The door's process already runs as root in its own directory tree; a chroot
                // keeps virtiofsd confined to the share without the cost of new namespaces.
                .args([
                    "--sandbox",
                    "chroot",
                    "--cache",
                    if share.keep_cache { "always" } else { "auto" },
                    // A pod's share has a host mount per container under it (its rootfs).
                    // Announced as submounts, each becomes a superblock of its own in the
                    // guest, and the guest kernel reuses the newest one when the tag is
                    // mounted again (for the next container): its root would be the previous
                    // container's rootfs.
                    "--no-announce-submounts",
                    "--log-level",
                    "error",
                ]);
            if share.export.read_only() {
                // Besides the kernel's read-only mount: virtiofsd refuses writes itself.
                cmd.arg("--readonly");
            }
            mounts.apply(&mut cmd);
            cmd.fd_mappings(vec![FdMapping {
                parent_fd: listener.into(),
                child_fd: LISTENER_FD,
            }])
            .map_err(|e| spawn_err(std::io::Error::other(e.to_string())))?;
            spawn_logged("virtiofsd", &mut cmd, log, 1)
        };
        let child = started().inspect_err(|_| {
            let _ = std::fs::remove_file(socket);
            if let Some(dir) = &staging {
                ShareMounts::remove_staging(dir);
            }
        })?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
            _log_cap: ConsoleCap::start(&[log.to_owned()], CONSOLE_CAP),
            staging,
        })
    }

    /// Kills and reaps virtiofsd and removes its socket (and staging directory).
    pub(crate) async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = &self.staging {
            ShareMounts::remove_staging(dir);
        }
    }
}

/// Waits until the VMM exits or one of its virtiofsd helpers does. A VM whose share is gone
/// cannot go on (the guest's file system requests would wait forever), so a helper's exit ends
/// the wait as an error naming it; the caller then stops the VM.
pub(crate) async fn wait_vm(
    vmm: Option<&mut Child>,
    fs: &mut [Virtiofsd],
) -> Result<VmExit, HypervisorError> {
    let vmm = vmm.ok_or(HypervisorError::NotStarted)?;
    tokio::select! {
        status = vmm.wait() => {
            // A VMM that could not reach a virtiofsd which failed to start exits too.
            if let Some(e) = failed_helper(fs) {
                return Err(e);
            }
            Ok(VmExit { status: status.map_err(HypervisorError::Process)? })
        }
        (i, status) = first_exit(fs) => {
            // A VMM that died takes virtiofsd's connection with it: virtiofsd may notice first
            // (and ends with success). The VMM's end is the root cause then, unless virtiofsd
            // failed on its own (at start, say), which a VMM then fails for.
            let status = status.map_err(HypervisorError::Process)?;
            if !failed(status) {
                if let Ok(vmm_status) = tokio::time::timeout(HELPER_EXIT_GRACE, vmm.wait()).await {
                    return Ok(VmExit { status: vmm_status.map_err(HypervisorError::Process)? });
                }
            }
            let detail = crate::tail_lines(&fs[i].log, 3).join(" | ");
            Err(HelperExited { program: "virtiofsd", status, detail }.into())
        }
    }
}

/// Kills the VMM (unless it already exited) and waits for it, then stops every virtiofsd:
/// both doors' way of ending a VM's processes.
pub(crate) async fn stop_vm(
    vmm: Option<Child>,
    fs: &mut Vec<Virtiofsd>,
) -> Result<(), HypervisorError> {
    if let Some(mut child) = vmm {
        if child
            .try_wait()
            .map_err(HypervisorError::Process)?
            .is_none()
        {
            child.start_kill().map_err(HypervisorError::Process)?;
        }
        child.wait().await.map_err(HypervisorError::Process)?;
    }
    for mut helper in fs.drain(..) {
        helper.stop().await;
    }
    Ok(())
}

/// How long a virtiofsd exit waits for the VMM's, which would explain it.
const HELPER_EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// The first virtiofsd of `fs` that exited with a failure code, as the error naming it: the
/// root cause when its VMM fails too (virtiofsd ends with success when its VMM goes; one
/// killed by a signal, as by the OOM killer beside its VMM, is not taken for the cause).
pub(crate) fn failed_helper(fs: &mut [Virtiofsd]) -> Option<HypervisorError> {
    fs.iter_mut().find_map(|f| match f.child.try_wait() {
        Ok(Some(status)) if failed(status) => Some(
            HelperExited {
                program: "virtiofsd",
                status,
                detail: crate::tail_lines(&f.log, 3).join(" | "),
            }
            .into(),
        ),
        _ => None,
    })
}

/// Whether a helper's `status` is an exit with a failure code (not a signal).
fn failed(status: std::process::ExitStatus) -> bool {
    status.code().is_some_and(|code| code != 0)
}

/// Index and exit status of the first virtiofsd to exit; never resolves when there is none.
async fn first_exit(fs: &mut [Virtiofsd]) -> (usize, std::io::Result<std::process::ExitStatus>) {
    let mut waits: Vec<_> = fs.iter_mut().map(|f| Box::pin(f.child.wait())).collect();
    std::future::poll_fn(|cx| {
        for (i, wait) in waits.iter_mut().enumerate() {
            if let Poll::Ready(status) = wait.as_mut().poll(cx) {
                return Poll::Ready((i, status));
            }
        }
        Poll::Pending
    })
    .await
}

/// The virtiofsd binary if `config` shares directories, after checking that the guest kernel
/// and initramfs exist: what every door needs before it starts anything.
pub(crate) fn require_inputs(config: &crate::VmConfig) -> Result<Option<PathBuf>, HypervisorError> {
    let virtiofsd = match config.shares.is_empty() {
        true => None,
        false => Some(find_program("virtiofsd").ok_or(HypervisorError::ProgramNotFound {
            program: "virtiofsd",
            hint: "install it with `cargo install virtiofsd` (needs libseccomp-dev libcap-ng-dev)",
        })?),
    };
    let inputs = [
        ("guest kernel", &config.kernel),
        ("initramfs", &config.initramfs),
    ];
    let plugged = config.disks.iter().filter(|d| !d.is_unplugged());
    let disks = plugged.map(|d| ("disk image", &d.path));
    for (what, path) in inputs.into_iter().chain(disks) {
        if !path.is_file() {
            return Err(HypervisorError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(virtiofsd)
}

/// `name` next to the running executable (an installed husk), else in PATH.
pub(crate) fn find_beside_or_in_path(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)));
    beside
        .filter(|p| p.is_file())
        .or_else(|| find_program(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_find_program_sh_found_and_missing_none() {
        assert!(find_program("sh").is_some());
        assert!(find_program("husk-no-such-program").is_none());
    }
}
