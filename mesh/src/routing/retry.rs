//! Whether a request that failed on one replica goes to another: the one rule the forwarding
//! node and the route-aware client both follow.
//!
//! At most [`MAX_RETRIES`] retry per request, on another replica, only while the request's
//! deadline leaves time (each attempt gets what is left, never the full timeout again), and only
//! with a token from a retry budget (tower's `TpsBudget`: retries may add at most a fifth to
//! the requests a node forwards, plus a floor of 10 per second), so a sick mesh is not
//! hammered with retries on top of its load. What is retried: a replica that no longer serves the
//! model (placement moved it, it is unloading), one that is unreachable or lost the
//! connection, one that is shutting down, and one whose admission refused the request (a 503:
//! its queue is full or predicts too long a wait; refused before any work, so another replica
//! with a shorter queue may take it, and the budget keeps an overloaded mesh from retrying
//! every refusal). What is not: a failure on the request's merits (it would fail the same way
//! elsewhere) and a deadline that passed. When the retry is spent too, the caller gets the
//! 503 and its `Retry-After`.

use crate::transport::TransportError;
use crate::wire::{Failure, FailureClass};
use std::time::{Duration, Instant};
use tower::retry::budget::{Budget, TpsBudget};

/// Retries per request, beyond its first attempt.
pub const MAX_RETRIES: usize = 1;

/// Least time an attempt is worth starting with: below it, the deadline has in effect passed.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(1);

/// How an attempt on a replica failed.
#[derive(Debug, Clone, Copy)]
pub enum Failed<'a> {
    /// The replica answered with a failure.
    Answered(&'a Failure),
    /// The exchange itself failed (unreachable, connection lost, no answer in time).
    Transport(&'a TransportError),
    /// The peer answered with a message that is no answer to the request: a broken peer.
    Unexpected,
    /// Over HTTP: a replica the route named answered 404, so it no longer serves the model.
    Moved,
    /// Over HTTP: the exchange failed without an answer; `timed_out` when it had the whole
    /// remaining deadline.
    Lost {
        /// Whether the attempt ran out of time.
        timed_out: bool,
    },
}

/// Whether this failure may succeed on another replica, budget and deadline permitting.
pub fn retryable(failed: Failed<'_>) -> bool {
    match failed {
        Failed::Answered(failure) => matches!(
            failure.class,
            FailureClass::NotHere | FailureClass::Unavailable
        ),
        // A timed-out attempt had the whole remaining deadline; a bad frame is a broken peer,
        // not a lost one.
        Failed::Transport(e) => !matches!(e, TransportError::Timeout { .. }) && e.is_retryable(),
        Failed::Unexpected => false,
        Failed::Moved => true,
        Failed::Lost { timed_out } => !timed_out,
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try another replica.
    Retry,
    /// Return this failure: it is not retryable, or retries are spent.
    GiveUp,
    /// It was retryable, but the retry budget is empty.
    BudgetSpent,
}

/// The retry rule with its budget; one per node (or client), shared by every request.
pub struct RetryPolicy {
    budget: TpsBudget,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        }
    }
}

impl RetryPolicy {
    /// Counts a request toward the budget (once per request, before its first attempt).
    fn started(&self) {
        self.budget.deposit();
    }

    /// After a failed attempt: whether the failure is `retryable` (see [`retryable`]),
    /// `retries` already made for this request, `left` of its deadline, and whether another
    /// replica remains to try.
    fn decide(
        &self,
        retryable: bool,
        retries: usize,
        left: Duration,
        another_replica: bool,
    ) -> Decision {
        if !retryable || retries >= MAX_RETRIES || left < MIN_ATTEMPT || !another_replica {
            Decision::GiveUp
        } else if self.budget.withdraw() {
            Decision::Retry
        } else {
            Decision::BudgetSpent
        }
    }
}

/// One request's attempts under a [`RetryPolicy`]: the deadline they share and the retries
/// made so far, kept by the one replica loop ([`super::replicas::run`]) that every caller
/// (the forwarding node, both route-aware clients) sends its requests through.
pub struct Attempts<'p> {
    policy: &'p RetryPolicy,
    deadline: Instant,
    retries: usize,
}

impl<'p> Attempts<'p> {
    /// A request with `timeout` from `now`, counted toward the policy's budget.
    pub fn start(policy: &'p RetryPolicy, timeout: Duration, now: Instant) -> Attempts<'p> {
        policy.started();
        Attempts {
            policy,
            deadline: now + timeout,
            retries: 0,
        }
    }

    /// What is left of the deadline at `now`: all the next attempt may take.
    pub fn left(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }

    /// After an attempt failed at `now` (`retryable`: see [`retryable`]): whether to try the
    /// next target (counted as a retry), given whether `another` target remains.
    pub fn after(&mut self, retryable: bool, another: bool, now: Instant) -> Decision {
        let decision = self
            .policy
            .decide(retryable, self.retries, self.left(now), another);
        if decision == Decision::Retry {
            self.retries += 1;
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(class: FailureClass, retry_after_ms: Option<u64>) -> Failure {
        let mut failure = Failure::new(class, "x");
        failure.retry_after_ms = retry_after_ms;
        failure
    }

    #[test]
    fn what_is_retried_elsewhere() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let yes = [
            failure(FailureClass::NotHere, None),
            failure(FailureClass::Unavailable, None),
            failure(FailureClass::Unavailable, Some(1000)),
        ];
        for f in &yes {
            assert!(retryable(Failed::Answered(f)), "{f:?}");
        }
        let no = [
            failure(FailureClass::InvalidInput, None),
            failure(FailureClass::NotFound, None),
            failure(FailureClass::DeadlineExceeded, None),
            failure(FailureClass::Internal, None),
        ];
        for f in &no {
            assert!(!retryable(Failed::Answered(f)), "{f:?}");
        }
        let lost = TransportError::Lost {
            addr,
            reason: "reset".into(),
        };
        assert!(retryable(Failed::Transport(&lost)));
        let timeout = TransportError::Timeout {
            addr,
            timeout: Duration::from_secs(1),
        };
        assert!(!retryable(Failed::Transport(&timeout)));
    }

    #[test]
    fn one_retry_within_the_deadline_with_another_replica() {
        let policy = RetryPolicy::default();
        policy.started();
        let failed = retryable(Failed::Answered(&failure(FailureClass::NotHere, None)));
        let second = Duration::from_secs(1);
        assert_eq!(policy.decide(failed, 0, second, true), Decision::Retry);
        assert_eq!(
            policy.decide(failed, 1, second, true),
            Decision::GiveUp,
            "one retry"
        );
        assert_eq!(
            policy.decide(failed, 0, Duration::from_micros(500), true),
            Decision::GiveUp,
            "deadline spent"
        );
        assert_eq!(
            policy.decide(failed, 0, second, false),
            Decision::GiveUp,
            "nowhere to go"
        );
        let busy = failure(FailureClass::Unavailable, Some(1000));
        assert_eq!(
            policy.decide(retryable(Failed::Answered(&busy)), 0, second, true),
            Decision::Retry,
            "a refusal at admission may go to the next replica"
        );
    }

    #[test]
    fn attempts_share_one_deadline_and_one_retry() {
        let policy = RetryPolicy::default();
        let start = Instant::now();
        let mut attempts = Attempts::start(&policy, Duration::from_millis(100), start);
        let moved = failure(FailureClass::NotHere, None);
        assert_eq!(attempts.left(start), Duration::from_millis(100));
        let later = start + Duration::from_millis(60);
        assert_eq!(
            attempts.left(later),
            Duration::from_millis(40),
            "the second attempt gets what is left, not the whole timeout again"
        );
        assert_eq!(
            attempts.after(retryable(Failed::Answered(&moved)), true, later),
            Decision::Retry
        );
        assert_eq!(
            attempts.after(retryable(Failed::Answered(&moved)), true, later),
            Decision::GiveUp,
            "one retry per request"
        );
        let mut late = Attempts::start(&policy, Duration::from_millis(100), start);
        assert_eq!(
            late.after(
                retryable(Failed::Answered(&moved)),
                true,
                start + Duration::from_millis(100)
            ),
            Decision::GiveUp,
            "no retry once the deadline passed"
        );
        let mut broken = Attempts::start(&policy, Duration::from_millis(100), start);
        assert_eq!(
            broken.after(retryable(Failed::Unexpected), true, start),
            Decision::GiveUp
        );
    }

    #[test]
    fn the_budget_caps_retries_at_a_fraction_of_requests() {
        let policy = RetryPolicy::default();
        let attempt = || policy.decide(true, 0, Duration::from_secs(1), true);
        // The floor: 10 per second over the 10 s window, with no requests at all.
        let floor = std::iter::repeat_with(attempt)
            .take(1000)
            .filter(|d| *d == Decision::Retry)
            .count();
        assert!(
            (90..=110).contains(&floor),
            "{floor} retries from the floor"
        );
        assert_eq!(attempt(), Decision::BudgetSpent);
        // 1000 requests buy 200 more retries, not 1000.
        for _ in 0..1000 {
            policy.started();
        }
        let more = std::iter::repeat_with(attempt)
            .take(1000)
            .filter(|d| *d == Decision::Retry)
            .count();
        assert!(
            (190..=210).contains(&more),
            "{more} retries for 1000 requests"
        );
    }
}
