//! Requests to republish this node's advert, coalesced: however many loads, unloads and
//! housekeeping ticks ask, the advert is rebuilt and published at most once per
//! [`MIN_INTERVAL`]. Building it rescans the model repository, and every changed advert is
//! fetched by every member and recomputes their placement: 600 unloads at once, each
//! publishing on its own, starved a five-node mesh until members were suspected.
//!
//! Most requests change what the node holds (a load, an unload, a housekeeping tick), and the
//! advert they publish rescans the repository. A node serving a load-following model also
//! republishes every half second only so that its load figures stay fresh
//! ([`AdvertRequests::ask_figures`]): those adverts reuse the last scan's catalog, so the
//! half-second figures cost no repository scan (one scan per model folder and config file,
//! which grows with the repository, at most as often as before load-following existed).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Shortest time between two publications of the advert.
pub(super) const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Outstanding requests for a new advert, and how far publication has caught up.
pub(super) struct AdvertRequests {
    /// Requests made so far (each one's ticket).
    requested: AtomicU64,
    wanted: Notify,
    /// The last ticket a published advert covers; `u64::MAX` once publishing stopped.
    published: watch::Sender<u64>,
    /// Whether a request since the last scan wants the repository scanned again (the first
    /// advert always does).
    rescan: AtomicBool,
}

impl AdvertRequests {
    pub(super) fn new() -> AdvertRequests {
        AdvertRequests {
            requested: AtomicU64::new(0),
            wanted: Notify::new(),
            published: watch::Sender::new(0),
            rescan: AtomicBool::new(true),
        }
    }

    /// Asks for the advert to be republished, and waits until an advert built after this call
    /// has been (or publishing stopped with the node).
    pub(super) async fn request(&self) {
        let mut published = self.published.subscribe();
        let ticket = self.ask();
        let _ = published.wait_for(|&done| done >= ticket).await;
    }

    /// Asks for the advert to be republished with the repository scanned again, without
    /// waiting; gives the request's ticket.
    pub(super) fn ask(&self) -> u64 {
        self.rescan.store(true, Ordering::Release);
        self.ask_figures()
    }

    /// Asks for the advert to be republished for its load figures only: the catalog of the
    /// last scan is reused, unless another request wants a rescan.
    pub(super) fn ask_figures(&self) -> u64 {
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.wanted.notify_one();
        ticket
    }

    /// Whether the advert being built must scan the repository again; taking the answer
    /// clears it, so requests made while it is built ask again.
    pub(super) fn take_rescan(&self) -> bool {
        self.rescan.swap(false, Ordering::AcqRel)
    }

    /// Serves requests until `stopped` says so: each wake-up publishes once for every
    /// request made before it started, then rests [`MIN_INTERVAL`].
    pub(super) async fn serve<F: Future<Output = ()>>(
        &self,
        mut publish: impl FnMut() -> F,
        stopped: impl Fn() -> bool,
    ) {
        loop {
            self.wanted.notified().await;
            if stopped() {
                break;
            }
            let covered = self.requested.load(Ordering::Acquire);
            publish().await;
            self.published.send_replace(covered);
            tokio::time::sleep(MIN_INTERVAL).await;
        }
        self.published.send_replace(u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn only_figure_requests_leave_the_last_scan_in_place() {
        let requests = AdvertRequests::new();
        assert!(requests.take_rescan(), "the first advert scans");
        assert!(!requests.take_rescan(), "taking the answer clears it");
        requests.ask_figures();
        requests.ask_figures();
        assert!(!requests.take_rescan(), "figures alone reuse the catalog");
        requests.ask_figures();
        requests.ask();
        requests.ask_figures();
        assert!(
            requests.take_rescan(),
            "a request for a rescan among figure requests is kept"
        );
        assert!(!requests.take_rescan());
    }

    #[tokio::test]
    async fn many_requests_at_once_publish_once_and_each_waits_for_an_advert_built_after_it() {
        let requests = Arc::new(AdvertRequests::new());
        let publications = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = {
            let (requests, publications, stop) =
                (requests.clone(), publications.clone(), stop.clone());
            tokio::spawn(async move {
                requests
                    .serve(
                        || {
                            publications.fetch_add(1, Ordering::SeqCst);
                            std::future::ready(())
                        },
                        || stop.load(Ordering::SeqCst),
                    )
                    .await;
            })
        };
        let waiters: Vec<_> = (0..600)
            .map(|_| {
                let requests = requests.clone();
                tokio::spawn(async move { requests.request().await })
            })
            .collect();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let after_burst = publications.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&after_burst),
            "{after_burst} publications for 600 requests"
        );
        // A later request is served by a new publication, after the rest.
        requests.request().await;
        assert_eq!(publications.load(Ordering::SeqCst), after_burst + 1);
        // Once publishing stops, a request returns instead of waiting for ever.
        stop.store(true, Ordering::SeqCst);
        requests.request().await;
        server.await.unwrap();
        requests.request().await;
    }
}
