//! OCI hooks (runtime spec, config.md "POSIX-platform Hooks") run on the host, each with the
//! container's state JSON on stdin: `createRuntime` and `prestart` once the container is
//! created (its process waiting), `poststart` after `start`, `poststop` when the container is
//! deleted (or a `husk run` ends). A failing `createRuntime`/`prestart` hook fails the create;
//! a failing `poststart`/`poststop` hook is logged. `createContainer` and `startContainer` run
//! in the container's namespaces, which are in the guest: the agent runs them there
//! ([`guest_hooks`]), their paths resolved in the container's rootfs (host binaries do not
//! exist in the VM).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::state::OciState;
use crate::SandboxError;

/// One hook: a host program, its argv and env, and an optional timeout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hook {
    /// Absolute path of the program.
    pub path: PathBuf,
    /// argv, `args[0]` included (the path when empty).
    pub args: Vec<String>,
    /// `KEY=VALUE`, the whole environment.
    pub env: Vec<String>,
    /// Seconds it may run.
    pub timeout: Option<u64>,
}

/// The host hooks of a bundle, by phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hooks {
    /// `createRuntime`, then the deprecated `prestart` (as runc runs both there).
    pub create_runtime: Vec<Hook>,
    /// `poststart`.
    pub poststart: Vec<Hook>,
    /// `poststop`.
    pub poststop: Vec<Hook>,
}

impl Hooks {
    /// The hooks of a config.json.
    ///
    /// # Errors
    /// A one-line reason: an invalid hook.
    pub fn from_spec(hooks: Option<&oci_spec::runtime::Hooks>) -> Result<Self, String> {
        let Some(hooks) = hooks else {
            return Ok(Self::default());
        };
        let mut create_runtime = convert(hooks.create_runtime())?;
        #[allow(deprecated)]
        create_runtime.extend(convert(hooks.prestart())?);
        Ok(Self {
            create_runtime,
            poststart: convert(hooks.poststart())?,
            poststop: convert(hooks.poststop())?,
        })
    }
}

/// The hooks of one phase of a config.json, checked: absolute paths, positive timeouts.
fn convert(list: &Option<Vec<oci_spec::runtime::Hook>>) -> Result<Vec<Hook>, String> {
    list.iter()
        .flatten()
        .map(|h| {
            if !h.path().is_absolute() {
                return Err(format!("hook path {} is not absolute", h.path().display()));
            }
            let timeout = match h.timeout() {
                None => None,
                Some(t) if t > 0 => u64::try_from(t).ok(),
                Some(t) => return Err(format!("hook timeout {t} is not positive")),
            };
            Ok(Hook {
                path: h.path().clone(),
                args: h.args().clone().unwrap_or_default(),
                env: h.env().clone().unwrap_or_default(),
                timeout,
            })
        })
        .collect()
}

/// The `createContainer` and `startContainer` hooks of a config.json, for the agent, with the
/// state they get on stdin (the agent adds `status` and `pid`): `ociVersion`, `id`, the host
/// path of the bundle, `annotations`.
///
/// # Errors
/// A one-line reason: a relative path or a timeout that is not positive.
pub fn guest_hooks(
    hooks: Option<&oci_spec::runtime::Hooks>,
    id: &str,
    bundle: &std::path::Path,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<husk_protocol::GuestHooks, String> {
    let Some(hooks) = hooks else {
        return Ok(husk_protocol::GuestHooks::default());
    };
    // Checked as the host's hooks are; the path is the rootfs's, the same string.
    let for_guest = |list: &Option<Vec<oci_spec::runtime::Hook>>| -> Result<Vec<_>, String> {
        Ok(convert(list)?
            .into_iter()
            .map(|h| husk_protocol::GuestHook {
                path: h.path.to_string_lossy().into_owned(),
                args: h.args,
                env: h.env,
                timeout_secs: h.timeout.map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
            })
            .collect())
    };
    let create_container = for_guest(hooks.create_container())?;
    let start_container = for_guest(hooks.start_container())?;
    let state = match create_container.is_empty() && start_container.is_empty() {
        true => String::new(),
        false => serde_json::json!({
            "ociVersion": crate::state::OCI_VERSION,
            "id": id,
            "bundle": bundle,
            "annotations": annotations,
        })
        .to_string(),
    };
    Ok(husk_protocol::GuestHooks {
        create_container,
        start_container,
        state,
    })
}

/// Runs `hooks` in order with `state` on stdin; the first failure is the error.
///
/// # Errors
/// [`SandboxError::Hook`] naming the phase, the program and why.
pub fn run(phase: &str, hooks: &[Hook], state: &OciState) -> Result<(), SandboxError> {
    let json = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        run_one(hook, &json).map_err(|reason| SandboxError::Hook {
            phase: phase.to_owned(),
            path: hook.path.clone(),
            reason,
        })?;
    }
    Ok(())
}

/// Runs every hook of `hooks` in order with `state` on stdin, logging a failure as a warning
/// and going on with the next (hooks after the fact: poststart, poststop; runtime spec,
/// runtime.md "Lifecycle": "the remaining hooks and lifecycle continue as if the hook had
/// succeeded").
pub fn run_logged(phase: &str, hooks: &[Hook], state: &OciState) {
    let json = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        if let Err(reason) = run_one(hook, &json) {
            warn!(phase, path = %hook.path.display(), %reason, "hook failed");
        }
    }
}

fn run_one(hook: &Hook, state: &[u8]) -> Result<(), String> {
    let mut cmd = Command::new(&hook.path);
    if let Some((first, rest)) = hook.args.split_first() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, first);
        cmd.args(rest);
    }
    cmd.env_clear();
    for pair in &hook.env {
        if let Some((k, v)) = pair.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state);
    }
    let deadline = hook
        .timeout
        .map(|t| Instant::now() + Duration::from_secs(t));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            let last = err.lines().last().unwrap_or("").trim().to_owned();
            return Err(format!("exited with {status}: {last}"));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "timed out after {}s",
                hook.timeout.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Status, OCI_VERSION};

    fn state() -> OciState {
        OciState {
            oci_version: OCI_VERSION.into(),
            id: "h1".into(),
            pid: 7,
            status: Status::Created,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: String::new(),
            owner: String::new(),
            annotations: Default::default(),
        }
    }

    fn sh(script: &str, timeout: Option<u64>) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["X=1".into()],
            timeout,
        }
    }

    #[test]
    fn test_run_hook_gets_state_on_stdin_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = sh(
            &format!("cat > {}; echo $X >> {}", out.display(), out.display()),
            None,
        );
        run("poststart", &[hook], &state()).unwrap();
        let text = std::fs::read_to_string(out).unwrap();
        assert!(text.contains(r#""id":"h1""#), "{text}");
        assert!(text.ends_with("1\n"), "{text}");
    }

    #[test]
    fn test_run_failing_hook_error_names_phase_and_reason() {
        let err = run("prestart", &[sh("echo nope >&2; exit 3", None)], &state()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("prestart") && text.contains("nope"), "{text}");
    }

    #[test]
    fn test_run_logged_goes_on_after_a_failing_hook() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hooks = [
            sh("exit 1", None),
            sh(&format!("echo second >> {}", out.display()), None),
        ];
        run_logged("poststart", &hooks, &state());
        assert_eq!(std::fs::read_to_string(out).unwrap(), "second\n");
    }

    #[test]
    fn test_run_hook_timeout_killed() {
        let t = Instant::now();
        let err = run("poststop", &[sh("sleep 10", Some(1))], &state()).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
