//! The operator's runtime configuration, `/etc/husk/config.toml` (`$HUSK_CONFIG` overrides the
//! path): which `io.husk.*` annotations a bundle may set and the largest VM they may ask for.
//!
//! Annotations come from whoever writes the bundle (a tenant's pod spec, through containerd's
//! `pod_annotations`): without this policy a tenant picks the door and a 64 GiB VM. A missing
//! file means [`RuntimeConfig::default`]: VM size annotations allowed up to 2048 MiB and 4
//! vCPUs, `io.husk.snapshot` allowed (it can only turn boot snapshots off), `io.husk.hypervisor`
//! not allowed (the door is the operator's choice, `--hypervisor`).
//!
//! ```toml
//! # annotations a bundle may set; others are ignored with a debug log line
//! allowed_annotations = ["io.husk.vm.memory", "io.husk.vm.vcpus", "io.husk.snapshot"]
//! max_memory_mib = 2048
//! max_vcpus = 4
//! ```
//!
//! The bundle's policy itself (ignore, refuse above the maxima, cap at the container's own
//! limits) is applied where the bundle is loaded, `bundle::VmOverrides`, for the CLI and the
//! shim alike.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bundle::{
    ANNOTATION_HYPERVISOR, ANNOTATION_MEMORY, ANNOTATION_SNAPSHOT, ANNOTATION_VCPUS,
};
use crate::SandboxError;

/// Where the runtime configuration is read from, unless [`CONFIG_ENV`] says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// Environment variable naming another runtime configuration file (tests, a second install).
pub const CONFIG_ENV: &str = "HUSK_CONFIG";

/// The largest guest memory an annotation may ask for by default.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 2048;
/// The most vCPUs an annotation may ask for by default.
pub const DEFAULT_MAX_VCPUS: u32 = 4;

/// The operator's policy for bundle annotations.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The `io.husk.*` annotations a bundle may set; the others are ignored.
    pub allowed_annotations: Vec<String>,
    /// The largest guest memory (MiB) `io.husk.vm.memory` may ask for (64..=65536).
    pub max_memory_mib: u32,
    /// The most vCPUs `io.husk.vm.vcpus` may ask for (1..=32).
    pub max_vcpus: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            allowed_annotations: vec![
                ANNOTATION_MEMORY.to_owned(),
                ANNOTATION_VCPUS.to_owned(),
                ANNOTATION_SNAPSHOT.to_owned(),
            ],
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            max_vcpus: DEFAULT_MAX_VCPUS,
        }
    }
}

impl RuntimeConfig {
    /// Reads the file `$HUSK_CONFIG` names, else [`DEFAULT_CONFIG_PATH`].
    ///
    /// # Errors
    /// As [`RuntimeConfig::load_from`].
    pub fn load() -> Result<Self, SandboxError> {
        let path = std::env::var_os(CONFIG_ENV)
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from);
        Self::load_from(&path)
    }

    /// Reads `path`; a missing file is the defaults.
    ///
    /// # Errors
    /// [`SandboxError::RuntimeConfig`] naming the file when it cannot be read, is not TOML, has
    /// a key husk does not know or a value out of range.
    pub fn load_from(path: &Path) -> Result<Self, SandboxError> {
        let invalid = |reason: String| SandboxError::RuntimeConfig {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(invalid),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(invalid(e.to_string())),
        }
    }

    /// Parses and checks a configuration's text.
    ///
    /// # Errors
    /// One line saying what is wrong (and on which line).
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| {
                text.get(..span.start)
                    .map_or(0, |t| t.matches('\n').count())
                    + 1
            });
            let message = e.message().trim().replace('\n', " ");
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            }
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        const KNOWN: [&str; 4] = [
            ANNOTATION_MEMORY,
            ANNOTATION_VCPUS,
            ANNOTATION_HYPERVISOR,
            ANNOTATION_SNAPSHOT,
        ];
        if let Some(unknown) = self
            .allowed_annotations
            .iter()
            .find(|a| !KNOWN.contains(&a.as_str()))
        {
            return Err(format!(
                "allowed_annotations: unknown annotation {unknown:?} (known: {})",
                KNOWN.join(", ")
            ));
        }
        if !(64..=65536).contains(&self.max_memory_mib) {
            return Err(format!(
                "max_memory_mib = {} is not in 64..=65536",
                self.max_memory_mib
            ));
        }
        if !(1..=32).contains(&self.max_vcpus) {
            return Err(format!("max_vcpus = {} is not in 1..=32", self.max_vcpus));
        }
        Ok(())
    }

    /// Whether a bundle may set annotation `key`.
    pub fn allows(&self, key: &str) -> bool {
        self.allowed_annotations.iter().any(|a| a == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_full_file_read() {
        let config = RuntimeConfig::parse(
            "# comment\nallowed_annotations = [\"io.husk.hypervisor\"]\nmax_memory_mib = 512\nmax_vcpus = 2\n",
        )
        .unwrap();
        assert_eq!(
            config,
            RuntimeConfig {
                allowed_annotations: vec![ANNOTATION_HYPERVISOR.to_owned()],
                max_memory_mib: 512,
                max_vcpus: 2,
            }
        );
        assert!(config.allows(ANNOTATION_HYPERVISOR));
        assert!(!config.allows(ANNOTATION_MEMORY));
    }

    #[test]
    fn test_parse_empty_file_defaults() {
        let config = RuntimeConfig::parse("").unwrap();
        assert_eq!(config, RuntimeConfig::default());
        assert!(config.allows(ANNOTATION_MEMORY) && config.allows(ANNOTATION_VCPUS));
        assert!(!config.allows(ANNOTATION_HYPERVISOR));
    }

    #[test]
    fn test_parse_unknown_key_one_line_with_line_number() {
        let err = RuntimeConfig::parse("max_vcpus = 2\nmax_memory = 100\n").unwrap_err();
        assert!(err.starts_with("line 2: "), "{err}");
        assert!(err.contains("max_memory"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn test_parse_bad_values_rejected() {
        for text in [
            "max_vcpus = 0",
            "max_vcpus = 33",
            "max_memory_mib = 32",
            "max_memory_mib = \"lots\"",
            "allowed_annotations = [\"io.husk.vm.memroy\"]",
        ] {
            assert!(RuntimeConfig::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn test_load_from_missing_file_defaults_and_bad_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        assert_eq!(
            RuntimeConfig::load_from(&missing).unwrap(),
            RuntimeConfig::default()
        );
        std::fs::write(&missing, "bogus = 1\n").unwrap();
        let err = RuntimeConfig::load_from(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
