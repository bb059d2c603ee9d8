//! `createContainer` and `startContainer` hooks, run by `container-init` in the container's
//! namespaces: each program (a path in the container's rootfs) with the container's state on
//! stdin, its own argv and environment, stdout discarded, the last line of its stderr in the
//! error when it fails; a hook that outlives its timeout is killed and fails.

use std::io::{self, Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::GuestHook;

/// Runs `hooks` of `phase` in order, each entering `root` first when given (before the
/// container's root is entered), with `state` plus `status` and this process's pid on stdin.
///
/// # Errors
/// The first hook that cannot start, exits non-zero or times out, as one line.
pub fn run(
    phase: &str,
    hooks: &[GuestHook],
    root: Option<&Path>,
    state: &str,
) -> Result<(), String> {
    if hooks.is_empty() {
        return Ok(());
    }
    let mut object = match serde_json::from_str::<serde_json::Value>(state) {
        Ok(serde_json::Value::Object(object)) => object,
        _ => serde_json::Map::new(),
    };
    object.insert("status".into(), "created".into());
    object.insert("pid".into(), std::process::id().into());
    let state = serde_json::Value::Object(object).to_string();
    for hook in hooks {
        run_one(hook, root, state.as_bytes())
            .map_err(|reason| format!("{phase} hook {}: {reason}", hook.path))?;
    }
    Ok(())
}

fn run_one(hook: &GuestHook, root: Option<&Path>, state: &[u8]) -> Result<(), String> {
    let mut cmd = Command::new(&hook.path);
    if let Some((first, rest)) = hook.args.split_first() {
        cmd.arg0(first);
        cmd.args(rest);
    }
    cmd.env_clear();
    cmd.envs(hook.env.iter().filter_map(|pair| pair.split_once('=')));
    if let Some(root) = root {
        crate::sys::with_root(&mut cmd, root).map_err(|e| e.to_string())?;
    }
    let mut stderr = tempfile().map_err(|e| format!("stderr file: {e}"))?;
    let child_stderr = stderr.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(child_stderr)
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state may close stdin early: not a failure.
        let _ = stdin.write_all(state);
    }
    let deadline = hook
        .timeout_secs
        .map(|t| Instant::now() + Duration::from_secs(u64::from(t)));
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "timed out after {}s",
                hook.timeout_secs.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    let _ = stderr.rewind();
    let _ = stderr.take(64 * 1024).read_to_string(&mut err);
    let last = err.lines().last().unwrap_or("").trim().to_owned();
    Err(format!("exited with {status}: {last}"))
}

/// An anonymous file in memory (the guest's root is a tmpfs anyway).
fn tempfile() -> io::Result<std::fs::File> {
    let fd = nix::sys::memfd::memfd_create(c"hook-stderr", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    Ok(std::fs::File::from(fd))
}
