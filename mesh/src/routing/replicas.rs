//! The one replica loop: pick a target, attempt it within what is left of the request's
//! deadline, and after a failure let the mesh's retry rule ([`super::retry`]) decide whether
//! another target is tried. The forwarding node and both route-aware clients send every request
//! through it. What stays theirs: how targets are picked ([`Targets`]: the node's balancer over
//! a route's replicas, the clients' route book falling back to their seeds) and what an attempt
//! is (a `meshserve/1` frame, an HTTP/3 request), with what it learns from the answer.

use crate::routing::retry::{Attempts, Decision};
use std::future::Future;
use std::time::{Duration, Instant};

/// How a failed attempt bears on trying another target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not retried, whatever the rule says: the target may have started on a request that
    /// must not run twice, or the failure is final.
    Never,
    /// As the rule says: another target if the failure is `retryable` (see
    /// [`super::retry::retryable`]), a retry is left, the deadline leaves time and the budget a
    /// token.
    Rule {
        /// Whether this failure could succeed elsewhere.
        retryable: bool,
    },
}

/// What one attempt came to.
pub enum Attempt<T, E> {
    /// An answer: the loop ends with it.
    Answered(T),
    /// A failure, and whether another target may be tried after it.
    Failed(E, Retry),
}

/// The targets of one request, in the order the caller's balancing picks them.
pub trait Targets {
    /// What an attempt is sent to.
    type Target: Clone;
    /// The next target to try, not tried before; `None` when none is left.
    fn next(&mut self) -> Option<Self::Target>;
    /// Whether a target is left after those picked so far.
    fn another(&self) -> bool;
}

/// How a request ended without an answer.
#[derive(Debug)]
pub struct Unanswered<E> {
    /// The last attempt's failure; `None` when there was no target to try.
    pub last: Option<E>,
    /// Targets tried.
    pub tried: usize,
}

/// Runs a request: `attempt` on one target after another (given what is left of the
/// deadline) until one answers, or a failure is not to be retried, or no target is left.
/// `decided` hears every failure with what was decided after it, for logs and metrics.
pub async fn run<Ts, T, E, F, Fut>(
    targets: &mut Ts,
    attempts: &mut Attempts<'_>,
    mut attempt: F,
    mut decided: impl FnMut(&Ts::Target, &E, Decision),
) -> Result<T, Unanswered<E>>
where
    Ts: Targets,
    F: FnMut(Ts::Target, Duration) -> Fut,
    Fut: Future<Output = Attempt<T, E>>,
{
    let mut last = None;
    let mut tried = 0;
    while let Some(target) = targets.next() {
        tried += 1;
        let left = attempts.left(Instant::now());
        let (failure, retry) = match attempt(target.clone(), left).await {
            Attempt::Answered(answer) => return Ok(answer),
            Attempt::Failed(failure, retry) => (failure, retry),
        };
        let decision = match retry {
            Retry::Never => Decision::GiveUp,
            Retry::Rule { retryable } => {
                attempts.after(retryable, targets.another(), Instant::now())
            }
        };
        decided(&target, &failure, decision);
        last = Some(failure);
        if decision != Decision::Retry {
            break;
        }
    }
    Err(Unanswered { last, tried })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::retry::RetryPolicy;

    /// Targets 0, 1, 2, ... up to `count`.
    struct Numbered {
        next: usize,
        count: usize,
    }

    impl Targets for Numbered {
        type Target = usize;
        fn next(&mut self) -> Option<usize> {
            (self.next < self.count).then(|| {
                self.next += 1;
                self.next - 1
            })
        }
        fn another(&self) -> bool {
            self.next < self.count
        }
    }

    async fn outcome(
        count: usize,
        results: Vec<Attempt<&'static str, &'static str>>,
    ) -> (Result<&'static str, Unanswered<&'static str>>, Vec<usize>) {
        let policy = RetryPolicy::default();
        let mut attempts = Attempts::start(&policy, Duration::from_secs(1), Instant::now());
        let mut targets = Numbered { next: 0, count };
        let mut results = results.into_iter();
        let mut asked = Vec::new();
        let result = run(
            &mut targets,
            &mut attempts,
            |target, _left| {
                asked.push(target);
                let next = results.next().expect("an attempt too many");
                async move { next }
            },
            |_, _, _| {},
        )
        .await;
        (result, asked)
    }

    #[tokio::test]
    async fn a_retryable_failure_goes_to_the_next_target_once() {
        let retryable = Retry::Rule { retryable: true };
        let (result, asked) = outcome(
            3,
            vec![Attempt::Failed("moved", retryable), Attempt::Answered("ok")],
        )
        .await;
        assert_eq!(result.unwrap(), "ok");
        assert_eq!(asked, [0, 1]);
        // One retry at most: the second failure ends the request though a target is left.
        let (result, asked) = outcome(
            3,
            vec![
                Attempt::Failed("moved", retryable),
                Attempt::Failed("moved again", retryable),
            ],
        )
        .await;
        let unanswered = result.unwrap_err();
        assert_eq!(
            (unanswered.last, unanswered.tried),
            (Some("moved again"), 2)
        );
        assert_eq!(asked, [0, 1]);
    }

    #[tokio::test]
    async fn a_final_failure_or_one_that_must_not_run_twice_ends_the_request() {
        for retry in [Retry::Never, Retry::Rule { retryable: false }] {
            let (result, asked) = outcome(3, vec![Attempt::Failed("refused", retry)]).await;
            assert_eq!(result.unwrap_err().last, Some("refused"), "{retry:?}");
            assert_eq!(asked, [0], "{retry:?}");
        }
    }

    #[tokio::test]
    async fn without_targets_nothing_is_tried() {
        let (result, asked) = outcome(0, vec![]).await;
        let unanswered = result.unwrap_err();
        assert_eq!((unanswered.last, unanswered.tried), (None, 0));
        assert!(asked.is_empty());
    }
}
