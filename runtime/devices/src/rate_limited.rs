//! Rate-limited logging for paths a guest can trigger.
//!
//! A hostile guest can make a device hit the same error branch millions of times per second;
//! logging each would flood the host log. Every call site of [`warn_rate_limited!`] and
//! [`debug_rate_limited!`] owns a [`RateLimiter`] that lets through at most
//! [`MAX_EVENTS_PER_WINDOW`] records per [`WINDOW_MS`]; the counters in each device's `metrics.rs`
//! keep the exact numbers.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Length of one rate-limiting window, in milliseconds.
pub(crate) const WINDOW_MS: u64 = 1000;
/// Records let through per call site and window.
pub(crate) const MAX_EVENTS_PER_WINDOW: u32 = 10;

/// Per-call-site limiter; lock-free, approximate under contention (good enough for logs).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    window_start_ms: AtomicU64,
    count: AtomicU32,
}

impl RateLimiter {
    /// A limiter whose first window starts at the first event.
    pub(crate) const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            count: AtomicU32::new(0),
        }
    }

    /// Returns whether a record may be emitted now.
    pub(crate) fn allow(&self) -> bool {
        let now = now_ms();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS || now < start {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.count.store(1, Ordering::Relaxed);
            return true;
        }
        self.count.fetch_add(1, Ordering::Relaxed) < MAX_EVENTS_PER_WINDOW
    }
}

/// Milliseconds since the first call in this process (monotonic); starts at `WINDOW_MS` so
/// that the first event opens a fresh window.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let elapsed = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(elapsed)
        .unwrap_or(u64::MAX)
        .saturating_add(WINDOW_MS)
}

/// `tracing::warn!` behind a per-call-site [`RateLimiter`].
macro_rules! warn_rate_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::rate_limited::RateLimiter =
            $crate::rate_limited::RateLimiter::new();
        if LIMITER.allow() {
            tracing::warn!($($arg)+);
        }
    }};
}

/// `tracing::debug!` behind a per-call-site [`RateLimiter`].
macro_rules! debug_rate_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::rate_limited::RateLimiter =
            $crate::rate_limited::RateLimiter::new();
        if LIMITER.allow() {
            tracing::debug!($($arg)+);
        }
    }};
}

pub(crate) use debug_rate_limited;
pub(crate) use warn_rate_limited;

/// Counts the tracing events `f` emits on this thread (for tests that bound log lines).
#[cfg(test)]
pub(crate) fn count_events(f: impl FnOnce()) -> usize {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata};

    struct Count(Arc<AtomicUsize>);
    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    let count = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::with_default(Count(count.clone()), f);
    count.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_limiter_burst_over_limit_suppressed() {
        let limiter = RateLimiter::new();
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, MAX_EVENTS_PER_WINDOW as usize);
    }
}
