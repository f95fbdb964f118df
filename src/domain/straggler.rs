//! Stragglers: a rank whose step rate stays below the job's median by more than a fraction
//! for a whole window. Rates come from the steps the heartbeats already carry; each rank's
//! rate is measured over the last seconds (at most 10 s, at most the window) up to now, so a
//! rank that stops stepping slows down too. Needs two ranks with a rate to compare.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a rank is a straggler, and what is done then.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StragglerPolicy {
    /// Slow means a rate below `median × (1 − fraction)`.
    pub fraction: f64,
    /// Slow for this long (continuously) means straggler.
    pub window: Duration,
    /// Restart a straggler (recorded as reason `straggler`), with the job's restart scope.
    pub restart: bool,
}

/// A change of a rank's straggler flag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub rank: u32,
    pub straggler: bool,
    /// The rank's steps/s and the job's median when it changed.
    pub rate: f64,
    pub median: f64,
}

#[derive(Debug, Default)]
struct RankRate {
    attempt: u32,
    samples: VecDeque<(Instant, u64)>,
    slow_since: Option<Instant>,
    flagged: bool,
}

impl RankRate {
    fn reset(&mut self, attempt: u32) {
        *self = RankRate {
            attempt,
            ..RankRate::default()
        };
    }

    fn rate(&self, now: Instant) -> Option<f64> {
        let (t0, s0) = *self.samples.front()?;
        let (_, s1) = *self.samples.back()?;
        let dt = now.duration_since(t0).as_secs_f64();
        (self.samples.len() >= 2 && dt > 0.0).then(|| s1.saturating_sub(s0) as f64 / dt)
    }
}

/// The straggler state of every rank of a job.
#[derive(Debug)]
pub struct Stragglers {
    policy: StragglerPolicy,
    ranks: Vec<RankRate>,
}

impl Stragglers {
    pub fn new(world_size: u32, policy: StragglerPolicy) -> Self {
        Stragglers {
            policy,
            ranks: (0..world_size).map(|_| RankRate::default()).collect(),
        }
    }

    pub fn policy(&self) -> StragglerPolicy {
        self.policy
    }

    fn rate_window(&self) -> Duration {
        self.policy.window.min(Duration::from_secs(10))
    }

    /// A heartbeat of incarnation `attempt` of `rank` reporting `step`.
    pub fn observe(&mut self, rank: u32, attempt: u32, step: u64, now: Instant) {
        let window = self.rate_window();
        let Some(r) = self.ranks.get_mut(rank as usize) else {
            return;
        };
        if r.attempt != attempt || r.samples.back().is_some_and(|&(_, s)| step < s) {
            r.reset(attempt);
        }
        if r.samples.back().is_some_and(|&(_, s)| s == step) {
            return;
        }
        r.samples.push_back((now, step));
        while r.samples.len() > 2
            && r.samples
                .get(1)
                .is_some_and(|&(t, _)| now.duration_since(t) >= window)
        {
            r.samples.pop_front();
        }
    }

    /// `rank` is not running (exited, restarting): it has no rate until it steps again.
    pub fn forget(&mut self, rank: u32) -> Option<Verdict> {
        let r = self.ranks.get_mut(rank as usize)?;
        let was = r.flagged;
        r.reset(r.attempt);
        was.then_some(Verdict {
            rank,
            straggler: false,
            rate: 0.0,
            median: 0.0,
        })
    }

    pub fn is_straggler(&self, rank: u32) -> bool {
        self.ranks.get(rank as usize).is_some_and(|r| r.flagged)
    }

    /// The rank's current steps/s, if it has one.
    pub fn rate(&self, rank: u32, now: Instant) -> Option<f64> {
        self.ranks.get(rank as usize)?.rate(now)
    }

    /// Compares every rank with the median; returns the flags that changed.
    pub fn check(&mut self, now: Instant) -> Vec<Verdict> {
        let rates: Vec<Option<f64>> = self.ranks.iter().map(|r| r.rate(now)).collect();
        let mut known: Vec<f64> = rates.iter().flatten().copied().collect();
        if known.len() < 2 {
            return Vec::new();
        }
        known.sort_by(f64::total_cmp);
        let n = known.len();
        let median = if n % 2 == 1 {
            known[n / 2]
        } else {
            (known[n / 2 - 1] + known[n / 2]) / 2.0
        };
        let threshold = median * (1.0 - self.policy.fraction);
        let settle = self.rate_window() / 2;
        let window = self.policy.window;
        let mut changes = Vec::new();
        for (rank, (r, rate)) in self.ranks.iter_mut().zip(rates).enumerate() {
            let Some(rate) = rate else { continue };
            // A rank measured for less than the rate window has no settled rate yet.
            let measured = r
                .samples
                .front()
                .is_some_and(|&(t, _)| now.duration_since(t) >= settle);
            let slow = measured && median > 0.0 && rate < threshold;
            if !slow {
                r.slow_since = None;
                if r.flagged {
                    r.flagged = false;
                    changes.push(Verdict {
                        rank: rank as u32,
                        straggler: false,
                        rate,
                        median,
                    });
                }
                continue;
            }
            let since = *r.slow_since.get_or_insert(now);
            if !r.flagged && now.duration_since(since) >= window {
                r.flagged = true;
                changes.push(Verdict {
                    rank: rank as u32,
                    straggler: true,
                    rate,
                    median,
                });
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> StragglerPolicy {
        StragglerPolicy {
            fraction: 0.5,
            window: Duration::from_secs(4),
            restart: false,
        }
    }

    /// Three ranks stepping at 10, 10 and `slow` steps/s for `secs` seconds, checked twice a second.
    fn run(s: &mut Stragglers, t0: Instant, from_s: u64, secs: u64, slow: u64) -> Vec<Verdict> {
        let mut changes = Vec::new();
        for tick in from_s * 2..(from_s + secs) * 2 {
            let now = t0 + Duration::from_millis(500 * tick);
            for (rank, per_s) in [(0, 10), (1, 10), (2, slow)] {
                s.observe(rank, 0, per_s * tick / 2, now);
            }
            changes.extend(s.check(now));
        }
        changes
    }

    #[test]
    fn a_rank_slow_for_the_whole_window_is_flagged_and_cleared_when_it_catches_up() {
        let t0 = Instant::now();
        let mut s = Stragglers::new(3, policy());
        assert!(run(&mut s, t0, 0, 10, 10).is_empty(), "equal rates: none");
        let mut s = Stragglers::new(3, policy());
        let changes = run(&mut s, t0, 0, 10, 3);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].rank, 2);
        assert!(changes[0].straggler);
        assert!((changes[0].median - 10.0).abs() < 1.0, "{changes:?}");
        assert!(s.is_straggler(2) && !s.is_straggler(0));
        // Back at full speed: cleared.
        let later = run(&mut s, t0, 10, 30, 30);
        assert!(
            later.iter().any(|v| v.rank == 2 && !v.straggler),
            "{later:?}"
        );
    }

    #[test]
    fn a_short_slowdown_is_not_a_straggler() {
        let t0 = Instant::now();
        let mut s = Stragglers::new(3, policy());
        // Slow for ~2 s only (less than the 4 s window), then normal again.
        let mut changes = run(&mut s, t0, 0, 4, 10);
        changes.extend(run(&mut s, t0, 4, 2, 2));
        changes.extend(run(&mut s, t0, 6, 10, 20));
        assert!(changes.iter().all(|v| !v.straggler), "{changes:?}");
    }

    #[test]
    fn one_rank_alone_has_no_median() {
        let t0 = Instant::now();
        let mut s = Stragglers::new(1, policy());
        for tick in 0..20 {
            let now = t0 + Duration::from_millis(500 * tick);
            s.observe(0, 0, tick, now);
            assert!(s.check(now).is_empty());
        }
    }
}
