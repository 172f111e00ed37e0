//! Capped exponential backoff with jitter, bounded by attempts and a deadline.

use std::time::Duration;

/// How a client retries: at most `attempts_max` attempts within `deadline`,
/// sleeping a random time up to `backoff_base · 2^n` (capped at `backoff_max`)
/// between them.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per call at most, the first included.
    pub attempts_max: u32,
    /// Longest a whole call (all attempts) may take.
    pub deadline: Duration,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff step.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 60,
            deadline: Duration::from_secs(15),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
        }
    }
}

impl RetryPolicy {
    /// The sleep before attempt `attempt` (1-based: the sleep after the first failure is attempt 1),
    /// with "full jitter".
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.backoff_max);
        let ms = exp.as_millis().max(1) as u64;
        Duration::from_millis(rand::random::<u64>() % ms + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_positive() {
        let p = RetryPolicy::default();
        for a in 0..40 {
            let d = p.backoff(a);
            assert!(d >= Duration::from_millis(1));
            assert!(d <= p.backoff_max + Duration::from_millis(1));
        }
    }
}
