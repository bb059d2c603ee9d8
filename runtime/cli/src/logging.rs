//! The tracing subscriber: stderr by default, `--log FILE` as runc, text or JSON lines.

use std::path::Path;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber.
pub fn init(log: Option<&Path>, format: &str, debug: bool) -> anyhow::Result<()> {
    // The `log` records of the rust-vmm crates (guest-triggered, unthrottled) go to tracing
    // through a rate limiter.
    let _ = husk_devices::install_log_bridge();
    let level = if debug { "debug" } else { "warn" };
    let filter = EnvFilter::try_from_env("HUSK_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let file = match log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?,
        ),
        None => None,
    };
    match (file, format) {
        (Some(f), "json") => builder.json().with_writer(std::sync::Mutex::new(f)).init(),
        (Some(f), _) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        (None, "json") => builder.json().with_writer(std::io::stderr).init(),
        (None, _) => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
