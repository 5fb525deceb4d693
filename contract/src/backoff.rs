//! How long to wait before trying again: exponential backoff with jitter, so that runners
//! that failed together (an API server outage, a refusing admission policy) do not retry
//! together.

use std::time::Duration;

use kube::runtime::watcher::ExponentialBackoff;

/// Waits that double from `first` up to `max`, each less a random part of up to half.
#[derive(Clone, Debug)]
pub struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            ceiling: first.min(max),
            max,
        }
    }

    /// The next wait, between half the current ceiling and the ceiling.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = ceiling.saturating_mul(2).min(self.max);
        jittered(ceiling)
    }
}

/// The backoff of every watch the operator and the runners keep: from 100 ms, doubling up to
/// `max`, jittered, and back to 100 ms after any event. kube's default waits up to 30 s (with
/// jitter, up to a minute) and only forgets the waits two minutes after the last error: after
/// an API server outage the first tries fail, the waits grow, and the watch that finally
/// expires (410) then relisted a minute late, leaving the caches (a job finished, a lane's
/// depth) stale for that long.
pub fn watch_backoff(max: Duration) -> ExponentialBackoff {
    ExponentialBackoff::from(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(max)
            .with_jitter()
            .without_max_times(),
    )
}

/// The longest wait of [`watch_backoff`] for the watches whose caches decide (jobs, lanes,
/// models, runners' jobs).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// `wait` less a random part of up to half: a fixed retry interval that many processes
/// failing together (after an outage) do not all keep.
pub fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(1.0 - rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_waits_at_most_its_cap_and_starts_over_after_an_event() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = watch_backoff(Duration::from_secs(5));
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next().unwrap()).collect();
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(10)),
            "{waits:?}"
        );
        assert!(waits[11] >= Duration::from_secs(5), "{waits:?}");
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(200));
    }

    #[test]
    fn waits_double_up_to_the_cap_and_are_jittered_below_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next_wait()).collect();
        let ceilings = [
            200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000,
        ];
        for (wait, ceiling) in waits.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *wait <= ceiling && *wait >= ceiling / 2,
                "{wait:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        // Jittered: ten runners starting together do not all wait the same.
        let firsts: std::collections::BTreeSet<Duration> = (0..10)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(10)).next_wait())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[test]
    fn a_jittered_wait_is_between_half_and_all_of_it_and_varies() {
        let second = Duration::from_secs(1);
        let waits: std::collections::BTreeSet<Duration> =
            (0..10).map(|_| jittered(second)).collect();
        assert!(
            waits.iter().all(|w| *w <= second && *w >= second / 2),
            "{waits:?}"
        );
        assert!(waits.len() > 1, "{waits:?}");
    }
}
