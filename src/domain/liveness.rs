//! When a silent rank counts as hung: silent for its heartbeat timeout, with the server able to
//! hear it for all of that time. While the server's HTTP listener is saturated (a flood of
//! slow clients), heartbeats wait in the kernel's backlog; a rank is given a whole timeout of
//! a listening server before it is declared hung.

use std::time::Duration;

/// What the watchdog does about a rank that has been `silent` this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Not hung: look again after this long.
    Recheck(Duration),
    /// Hung: take its stacks and kill it.
    Hung,
}

/// `saturated_ago`: how long ago the server's listener was last saturated (zero: it is now;
/// none: never).
pub fn watch(silent: Duration, timeout: Duration, saturated_ago: Option<Duration>) -> Watch {
    if silent < timeout {
        return Watch::Recheck(timeout - silent);
    }
    match saturated_ago {
        // The server could not have heard it for part of the window.
        Some(ago) if ago < timeout => Watch::Recheck(timeout - ago),
        _ => Watch::Hung,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_only_while_the_server_listens() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        for (silent, timeout, saturated, expected) in [
            (ms(500), s(2), None, Watch::Recheck(ms(1500))),
            (s(2), s(2), None, Watch::Hung),
            (s(3), s(2), Some(s(10)), Watch::Hung),
            (s(3), s(2), Some(Duration::ZERO), Watch::Recheck(s(2))),
            (s(3), s(2), Some(ms(500)), Watch::Recheck(ms(1500))),
            (s(3), s(2), Some(s(2)), Watch::Hung),
            (
                ms(100),
                s(2),
                Some(Duration::ZERO),
                Watch::Recheck(ms(1900)),
            ),
        ] {
            assert_eq!(
                watch(silent, timeout, saturated),
                expected,
                "{silent:?} {timeout:?} {saturated:?}"
            );
        }
    }
}
