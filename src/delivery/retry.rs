//! What an appservice's answer means, and how long to wait before trying again. Pure.
//!
//! Success is a 2xx status with a JSON body, as Synapse requires. Anything else (other statuses,
//! a non-JSON body, a connection error, a timeout) is retried, forever, with exponential backoff
//! and full jitter between `initial` and a cap, honouring `Retry-After` (in seconds) when the
//! appservice sends one: the next wait is at least that long, at most the cap.

use std::time::Duration;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// Classify an HTTP answer.
pub fn classify_response(status: u16, retry_after: Option<&str>, body: &[u8]) -> AttemptOutcome {
    let retry_after = retry_after.and_then(parse_retry_after);
    if !(200..300).contains(&status) {
        return AttemptOutcome::Retry {
            reason: format!("HTTP status {status}"),
            retry_after,
        };
    }
    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) => AttemptOutcome::Delivered,
        Err(e) => AttemptOutcome::Retry {
            reason: format!(
                "HTTP status {status} but the body is not JSON ({e}); Synapse treats that as a failure too"
            ),
            retry_after,
        },
    }
}

/// `Retry-After: <seconds>`. (The HTTP-date form is not used by appservice frameworks; it is
/// ignored and the normal backoff applies.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The backoff schedule for one appservice: `backon`'s exponential backoff with jitter, without
/// an attempt limit, reset after each delivered transaction.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// A fresh schedule.
    pub fn schedule(&self) -> RetrySchedule {
        use backon::BackoffBuilder;
        RetrySchedule {
            inner: backon::ExponentialBuilder::default()
                .with_min_delay(self.initial)
                .with_max_delay(self.max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build(),
            max: self.max,
        }
    }
}

/// Successive waits of one retry sequence.
#[derive(Debug)]
pub struct RetrySchedule {
    inner: backon::ExponentialBackoff,
    max: Duration,
}

impl RetrySchedule {
    /// The wait before the next attempt, given what the appservice asked for.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let backoff = self.inner.next().unwrap_or(self.max).min(self.max);
        match retry_after {
            Some(r) => backoff.max(r.min(self.max)),
            None => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_with_json_is_delivered() {
        assert_eq!(classify_response(200, None, b"{}"), AttemptOutcome::Delivered);
        assert_eq!(classify_response(204, None, b"[]"), AttemptOutcome::Delivered);
        for (status, body) in [
            (200u16, &b""[..]),
            (200, b"OK"),
            (500, b"{}"),
            (404, b"{}"),
            (429, b"{}"),
            (301, b"{}"),
        ] {
            assert!(
                matches!(classify_response(status, None, body), AttemptOutcome::Retry { .. }),
                "{status} {body:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(
            classify_response(429, Some("7"), b"{}"),
            AttemptOutcome::Retry {
                reason: "HTTP status 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_honours_retry_after() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut s = policy.schedule();
        let delays: Vec<Duration> = (0..12).map(|_| s.next_delay(None)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)), "{delays:?}");
        assert!(delays[0] >= Duration::from_millis(100), "{delays:?}");
        assert!(
            delays[11] >= Duration::from_secs(1),
            "reaches the cap region: {delays:?}"
        );
        let mut s = policy.schedule();
        assert_eq!(
            s.next_delay(Some(Duration::from_secs(60))),
            Duration::from_secs(2),
            "Retry-After capped"
        );
        let mut s = RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(30),
        }
        .schedule();
        assert!(s.next_delay(Some(Duration::from_secs(5))) >= Duration::from_secs(5));
    }
}
