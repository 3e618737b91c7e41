//! What happens when a machine's QEMU dies (issue 14): its restart policy, and for
//! `on-failure` whether to start it again, after how long, or to give up.

use std::time::Duration;

/// A machine's restart policy: `never` (the default: a crashed machine reads stopped and waits
/// for its tenant) or `on-failure` (started again, within [`RestartLimits`]). A guest that
/// powers itself off has not failed and is never restarted. One type from the API down.
pub use skygate_api_types::RestartPolicy;

/// How far `on-failure` goes: at most `max` automatic restarts within any `window`, the n-th
/// of them after `backoff × 2^(n-1)`, at most `max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimits {
    pub max: u32,
    pub window: Duration,
    pub backoff: Duration,
    /// The longest wait: [`MAX_BACKOFF`], or less when the deadline of `starting` (which the
    /// machine is in while it waits) is short, so that no wait outlasts it.
    pub max_delay: Duration,
}

impl Default for RestartLimits {
    fn default() -> Self {
        Self {
            max: 5,
            window: Duration::from_secs(600),
            backoff: Duration::from_secs(5),
            max_delay: MAX_BACKOFF,
        }
    }
}

impl RestartLimits {
    /// These limits with waits kept under half of `transition_timeout`, the deadline after
    /// which a machine still `starting` is failed.
    pub fn within(self, transition_timeout: Duration) -> Self {
        Self {
            max_delay: self.max_delay.min(transition_timeout / 2),
            ..self
        }
    }
}

/// The longest wait before a restart with the default deadlines.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The decision after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start it again after `delay`; this is restart `attempt` in the window. `history` is
    /// what to keep: the restarts still in the window, this one included.
    Restart {
        attempt: u32,
        delay: Duration,
        history: Vec<i64>,
    },
    /// It was restarted `restarts` times within the window already: it stays stopped.
    GiveUp { restarts: u32 },
}

/// Decides what to do after a crash at `now`, given the times of earlier automatic restarts
/// (Unix microseconds, any order). Restarts older than the window no longer count.
pub fn after_crash(history: &[i64], now: i64, limits: RestartLimits) -> AfterCrash {
    let window = i64::try_from(limits.window.as_micros()).unwrap_or(i64::MAX);
    let mut recent: Vec<i64> = history
        .iter()
        .copied()
        .filter(|t| now.saturating_sub(*t) < window)
        .collect();
    recent.sort_unstable();
    let restarts = u32::try_from(recent.len()).unwrap_or(u32::MAX);
    if restarts >= limits.max {
        return AfterCrash::GiveUp { restarts };
    }
    let delay = limits
        .backoff
        .saturating_mul(2_u32.saturating_pow(restarts))
        .min(limits.max_delay);
    recent.push(now);
    AfterCrash::Restart {
        attempt: restarts + 1,
        delay,
        history: recent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;
    const LIMITS: RestartLimits = RestartLimits {
        max: 3,
        window: Duration::from_secs(600),
        backoff: Duration::from_secs(5),
        max_delay: MAX_BACKOFF,
    };

    #[test]
    fn restarts_back_off_then_give_up_at_the_cap() {
        let mut history = Vec::new();
        let mut delays = Vec::new();
        for n in 0..3 {
            match after_crash(&history, 1000 * SEC + n * SEC, LIMITS) {
                AfterCrash::Restart {
                    attempt,
                    delay,
                    history: kept,
                } => {
                    assert_eq!(i64::from(attempt), n + 1);
                    delays.push(delay.as_secs());
                    history = kept;
                }
                other => panic!("restart {n}: {other:?}"),
            }
        }
        assert_eq!(delays, [5, 10, 20]);
        assert_eq!(
            after_crash(&history, 1010 * SEC, LIMITS),
            AfterCrash::GiveUp { restarts: 3 }
        );
    }

    #[test]
    fn restarts_older_than_the_window_no_longer_count() {
        let history = [0, 100 * SEC, 200 * SEC];
        // 601 s after the first: two remain in the window.
        match after_crash(&history, 601 * SEC, LIMITS) {
            AfterCrash::Restart {
                attempt, history, ..
            } => {
                assert_eq!(attempt, 3);
                assert_eq!(history, [100 * SEC, 200 * SEC, 601 * SEC]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_wait_is_bounded_and_no_cap_never_overflows() {
        let limits = RestartLimits {
            max: u32::MAX,
            window: Duration::from_secs(u64::MAX / 2),
            backoff: Duration::from_secs(60),
            max_delay: MAX_BACKOFF,
        };
        let history: Vec<i64> = (0..40).collect();
        match after_crash(&history, 41, limits) {
            AfterCrash::Restart { delay, .. } => assert_eq!(delay, MAX_BACKOFF),
            other => panic!("{other:?}"),
        }
        let never = RestartLimits { max: 0, ..LIMITS };
        // A short deadline shortens the longest wait.
        let short = LIMITS.within(Duration::from_secs(60));
        match after_crash(&[1, 2], 3, short) {
            AfterCrash::Restart { delay, .. } => assert_eq!(delay, Duration::from_secs(20)),
            other => panic!("{other:?}"),
        }
        let shorter = LIMITS.within(Duration::from_secs(20));
        match after_crash(&[1, 2], 3, shorter) {
            AfterCrash::Restart { delay, .. } => assert_eq!(delay, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            after_crash(&[], 0, never),
            AfterCrash::GiveUp { restarts: 0 }
        );
    }

    #[test]
    fn policies_read_back_what_they_write() {
        for p in [RestartPolicy::Never, RestartPolicy::OnFailure] {
            assert_eq!(p.as_str().parse::<RestartPolicy>(), Ok(p));
        }
        assert!("always".parse::<RestartPolicy>().is_err());
    }
}
