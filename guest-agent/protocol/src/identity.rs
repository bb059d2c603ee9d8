//! What makes a guest its own: the host's entropy and wall-clock time, given to every guest
//! right after boot ([`crate::Request::SetIdentity`], version 9).
//!
//! A guest restored from a snapshot resumes with the snapshot's kernel random state and clock:
//! without this, every VM restored from one snapshot would produce the same random stream and
//! believe it is the moment the snapshot was taken.

use serde::{Deserialize, Serialize};

/// Fewest seed bytes accepted: 256 bits, what the kernel's CRNG needs to be seeded.
pub const MIN_SEED_LEN: usize = 32;
/// Most seed bytes accepted.
pub const MAX_SEED_LEN: usize = 512;

/// The host's part of a guest's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// Random bytes from the host, mixed into the guest kernel's input pool and credited, then
    /// the CRNG is reseeded from it ([`MIN_SEED_LEN`]..=[`MAX_SEED_LEN`] bytes).
    pub seed: Vec<u8>,
    /// The host's `CLOCK_REALTIME` in nanoseconds since the epoch, set as the guest's.
    pub realtime_ns: u64,
}

impl GuestIdentity {
    /// Checks the seed's length and that the time is after the epoch.
    ///
    /// # Errors
    /// One line naming the field that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_SEED_LEN..=MAX_SEED_LEN).contains(&self.seed.len()) {
            return Err(format!(
                "identity: a seed of {} bytes is outside {MIN_SEED_LEN}..={MAX_SEED_LEN}",
                self.seed.len()
            ));
        }
        if self.realtime_ns == 0 || i64::try_from(self.realtime_ns).is_err() {
            return Err(format!(
                "identity: time {} ns is out of range",
                self.realtime_ns
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_bounds_seed_and_time() {
        let ok = GuestIdentity {
            seed: vec![1; MIN_SEED_LEN],
            realtime_ns: 1,
        };
        assert!(ok.validate().is_ok());
        let short = GuestIdentity {
            seed: vec![1; MIN_SEED_LEN - 1],
            ..ok.clone()
        };
        assert!(short.validate().unwrap_err().contains("31 bytes"));
        let long = GuestIdentity {
            seed: vec![1; MAX_SEED_LEN + 1],
            ..ok.clone()
        };
        assert!(long.validate().is_err());
        let never = GuestIdentity {
            realtime_ns: u64::MAX,
            ..ok
        };
        assert!(never.validate().unwrap_err().contains("out of range"));
    }
}
