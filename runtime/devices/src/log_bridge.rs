//! The `log` crate's records, rate-limited, into `tracing`.
//!
//! virtio-queue, vhost and vhost-user-backend log through `log`, and many of their records are
//! guest-triggered (`log::error!` for every bad ring a guest makes them look at): unthrottled,
//! a guest could flood the host log. [`install_log_bridge`] makes [`RateLimitedLog`] the
//! process's `log` logger: each record goes through a [`RateLimiter`] chosen by its call site
//! (file and line; a fixed table, so call sites may share one) and, if let through, becomes a
//! `tracing` event at the same level, with the `log` target as a field. Binaries call it once
//! at start-up, before or after installing their tracing subscriber (tracing-subscriber is
//! built without its own `log` bridge, which would not be rate-limited).

use std::hash::{DefaultHasher, Hash, Hasher};

use log::{Level, LevelFilter, Log, Metadata, Record};
use tracing::level_filters::LevelFilter as TracingFilter;

use crate::rate_limited::RateLimiter;

/// Call-site buckets of the limiter table.
const BUCKETS: usize = 64;

/// A `log::Log` that rate-limits per call site and forwards to `tracing`.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    limiters: [RateLimiter; BUCKETS],
}

static LOGGER: RateLimitedLog = RateLimitedLog {
    limiters: [const { RateLimiter::new() }; BUCKETS],
};

/// Makes [`RateLimitedLog`] the process's `log` logger.
///
/// # Errors
/// Another `log` logger was installed first (then that one stays).
pub fn install_log_bridge() -> Result<(), log::SetLoggerError> {
    log::set_logger(&LOGGER)?;
    log::set_max_level(LevelFilter::Trace);
    Ok(())
}

impl RateLimitedLog {
    fn limiter(&self, record: &Record<'_>) -> Option<&RateLimiter> {
        let mut hasher = DefaultHasher::new();
        (record.file(), record.line(), record.target()).hash(&mut hasher);
        let bucket = usize::try_from(hasher.finish() % BUCKETS as u64).ok()?;
        self.limiters.get(bucket)
    }
}

impl Log for RateLimitedLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let level = match metadata.level() {
            Level::Error => TracingFilter::ERROR,
            Level::Warn => TracingFilter::WARN,
            Level::Info => TracingFilter::INFO,
            Level::Debug => TracingFilter::DEBUG,
            Level::Trace => TracingFilter::TRACE,
        };
        level <= TracingFilter::current()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) || !self.limiter(record).is_some_and(|l| l.allow()) {
            return;
        }
        let (target, args) = (record.target(), record.args());
        match record.level() {
            Level::Error => tracing::error!(log_target = target, "{args}"),
            Level::Warn => tracing::warn!(log_target = target, "{args}"),
            Level::Info => tracing::info!(log_target = target, "{args}"),
            Level::Debug => tracing::debug!(log_target = target, "{args}"),
            Level::Trace => tracing::trace!(log_target = target, "{args}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limited::{count_events, MAX_EVENTS_PER_WINDOW};

    #[test]
    fn test_rate_limited_log_flood_from_one_call_site_bounded() {
        let logger = RateLimitedLog {
            limiters: [const { RateLimiter::new() }; BUCKETS],
        };

        let lines = count_events(|| {
            for _ in 0..100_000 {
                logger.log(
                    &Record::builder()
                        .level(Level::Error)
                        .target("virtio_queue::queue")
                        .file_static(Some("queue.rs"))
                        .line(Some(573))
                        .args(format_args!("Iterator error"))
                        .build(),
                );
            }
        });

        assert_eq!(lines, MAX_EVENTS_PER_WINDOW as usize);
    }
}
