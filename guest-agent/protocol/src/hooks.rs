//! The hooks the agent runs in a container's namespaces: `createContainer` (after the mounts,
//! before the root is entered) and `startContainer` (at start, after the root is entered,
//! before the process). Their paths resolve in the container's rootfs: the host's files do
//! not exist inside the VM.

use serde::{Deserialize, Serialize};

/// Most hooks of one phase.
pub const MAX_HOOKS: usize = 64;
/// Longest state document the hooks get on stdin.
pub const MAX_HOOK_STATE: usize = 64 * 1024;

/// One hook (config.json's `hooks.*[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHook {
    /// Absolute path in the container's rootfs.
    pub path: String,
    /// argv, `argv[0]` first (empty: the path).
    #[serde(default)]
    pub args: Vec<String>,
    /// The hook's whole environment, `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds the hook may run; it is killed and fails after.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

/// A container's in-guest hooks (version 8).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHooks {
    /// `createContainer`, in order.
    #[serde(default)]
    pub create_container: Vec<GuestHook>,
    /// `startContainer`, in order.
    #[serde(default)]
    pub start_container: Vec<GuestHook>,
    /// The container's state as the hooks get it on stdin (a JSON object: `ociVersion`, `id`,
    /// `bundle`, `annotations`), to which the agent adds `status` and `pid`.
    #[serde(default)]
    pub state: String,
}

impl GuestHooks {
    /// Whether there is no hook.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.create_container.is_empty() && self.start_container.is_empty()
    }

    /// Checks the fields a hostile or buggy peer could get wrong.
    ///
    /// # Errors
    /// A one-line description of the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        for (phase, hooks) in [
            ("createContainer", &self.create_container),
            ("startContainer", &self.start_container),
        ] {
            if hooks.len() > MAX_HOOKS {
                return Err(format!("more than {MAX_HOOKS} {phase} hooks"));
            }
            for hook in hooks {
                hook.validate(phase)?;
            }
        }
        if self.is_empty() {
            return Ok(());
        }
        if self.state.len() > MAX_HOOK_STATE {
            return Err(format!("hook state is longer than {MAX_HOOK_STATE} bytes"));
        }
        match serde_json::from_str::<serde_json::Value>(&self.state) {
            Ok(serde_json::Value::Object(_)) => Ok(()),
            _ => Err("hook state is not a JSON object".into()),
        }
    }
}

impl GuestHook {
    fn validate(&self, phase: &str) -> Result<(), String> {
        let path = &self.path;
        if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
            return Err(format!(
                "{phase} hook path {path:?} is not an absolute path"
            ));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(format!("{phase} hook {path} has an argument with NUL"));
        }
        if self
            .env
            .iter()
            .any(|e| !e.contains('=') || e.contains('\0'))
        {
            return Err(format!(
                "{phase} hook {path}: env entries must be KEY=VALUE without NUL bytes"
            ));
        }
        if self.timeout_secs == Some(0) {
            return Err(format!("{phase} hook {path}: timeout must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(path: &str) -> GuestHook {
        GuestHook {
            path: path.into(),
            args: vec!["h".into()],
            env: vec!["A=b".into()],
            timeout_secs: Some(5),
        }
    }

    #[test]
    fn test_guest_hooks_validate_paths_env_timeout_state() {
        let ok = GuestHooks {
            create_container: vec![hook("/bin/h")],
            start_container: vec![],
            state: r#"{"id":"c"}"#.into(),
        };
        assert!(ok.validate().is_ok());
        assert!(GuestHooks::default().validate().is_ok());
        let bad = |f: &dyn Fn(&mut GuestHooks)| {
            let mut h = ok.clone();
            f(&mut h);
            h.validate().unwrap_err()
        };
        assert!(bad(&|h| h.create_container[0].path = "bin/h".into()).contains("absolute"));
        assert!(bad(&|h| h.create_container[0].env = vec!["A".into()]).contains("KEY=VALUE"));
        assert!(bad(&|h| h.create_container[0].timeout_secs = Some(0)).contains("positive"));
        assert!(bad(&|h| h.state = "[]".into()).contains("JSON object"));
        assert!(
            bad(&|h| h.start_container = vec![hook("/x"); MAX_HOOKS + 1]).contains("more than")
        );
    }
}
