//! Placement-driven loading: every period the node re-publishes its advert and compares the
//! plan with what it has loaded. A model placed here is loaded at once; a model no longer
//! placed here is unloaded (the engine drains its queue first) only once the plan has been
//! stable for a while and another replica already serves it, so no request loses its replica.

use crate::cluster::Cluster;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the placement epoch must stay unchanged before models are unloaded.
const SETTLE: Duration = Duration::from_secs(3);

pub(super) async fn run(cluster: Arc<Cluster>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut epoch = (0u64, Instant::now());
    loop {
        tick.tick().await;
        if cluster.gossip.is_closed() {
            break;
        }
        cluster.publish_advert();
        let view = cluster.view();
        if view.plan.epoch != epoch.0 {
            epoch = (view.plan.epoch, Instant::now());
        }
        let settled = epoch.1.elapsed() >= SETTLE;
        let placed_here: BTreeSet<&str> = view
            .plan
            .routes
            .iter()
            .filter(|r| r.replicas.iter().any(|x| x.node == cluster.name))
            .map(|r| r.model.as_str())
            .collect();
        let loaded: BTreeSet<String> = cluster.engine.loaded_models().into_iter().collect();
        let managed: BTreeSet<&str> = view.plan.routes.iter().map(|r| r.model.as_str()).collect();
        for model in managed {
            let here = placed_here.contains(model);
            let is_loaded = loaded.contains(model);
            if here && !is_loaded {
                tracing::info!(%model, epoch = format!("{:016x}", view.plan.epoch), "placement: loading");
                let engine = cluster.engine.clone();
                let name = model.to_string();
                let result = tokio::task::spawn_blocking(move || engine.load(&name)).await;
                match result {
                    Ok(Ok(())) => cluster.publish_advert(),
                    Ok(Err(e)) => tracing::error!(%model, error = %e, "placement: load failed"),
                    Err(e) => tracing::error!(%model, error = %e, "placement: load panicked"),
                }
            } else if !here && is_loaded && settled {
                let others: Vec<&str> = view
                    .plan
                    .routes
                    .iter()
                    .filter(|r| r.model == model)
                    .flat_map(|r| r.replicas.iter())
                    .filter(|r| r.node != cluster.name && view.serving(&r.node, model))
                    .map(|r| r.node.as_str())
                    .collect();
                if others.is_empty() {
                    continue;
                }
                tracing::info!(%model, served_by = ?others, "placement: no longer placed here; unloading");
                if let Err(e) = cluster.engine.unload(model) {
                    tracing::warn!(%model, error = %e, "placement: unload failed");
                }
                cluster.publish_advert();
            }
        }
    }
}
