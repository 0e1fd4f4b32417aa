//! Placement-driven loading: every period the node re-publishes its advert and compares the
//! plan with what it has loaded, and whenever its view of the mesh changes it starts loading
//! what the plan newly puts here. A model placed here is loaded at once, after fetching its
//! files from a holder (by digest) when this node lacks them; a model no longer placed here is
//! unloaded only once the plan has been stable for a while and another replica already serves
//! it, in an order that loses no request: stop advertising it (peers stop sending it here),
//! wait for the notice to reach them, then unload (the engine drains its queue first). A
//! request that still arrives after that is answered "not here" and retried elsewhere.

use crate::cluster::{Cluster, MeshView, bundle, memory};
use crate::wire::{
    EndpointEntry, Failure, FailureClass, FetchChunk, FetchModel, Message, NodeAdvert,
};
use meshserve_host::model::repository::FROM_MESH_MARKER;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the placement epoch must stay unchanged before models are unloaded.
const SETTLE: Duration = Duration::from_secs(3);

/// How long peers have to learn that a model is no longer served here before it is unloaded:
/// a notice and an advert fetch take a round trip or two; a lost notice is repaired by the next
/// one, and a request that still comes is retried on another replica.
const UNADVERTISE_GRACE: Duration = Duration::from_secs(1);

/// How long one manifest or chunk call of a model fetch may take.
const FETCH_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes asked for in one chunk (also at most half this node's frame limit): large enough
/// that a round trip per chunk costs little, small enough that a transfer holds little memory.
const CHUNK_BYTES: u64 = 4 << 20;

/// How many times in a row a busy holder is waited for before the fetch gives up on it.
const BUSY_WAITS: u32 = 10;

/// Longest wait for a busy holder, whatever it asks for.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(5);

/// How long a holder's final refusal of a fetch (it holds another version, or its manifest
/// disagrees with its advert) is remembered: asking again every period would make it check
/// the same files every second for nothing.
pub(super) const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

pub(super) async fn run(cluster: Arc<Cluster>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A node serving a load-following model republishes its advert as often as its meters
    // measure, so the mesh's replica policy samples fresh figures.
    let mut load_tick = tokio::time::interval(meshserve_host::metrics::in_flight::PERIOD);
    load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut views = cluster.view.clone();
    let mut epoch = (0u64, Instant::now());
    loop {
        // The advert is republished, and unloads and endpoint folders looked at, once a
        // period; a model placed here starts loading as soon as the view says so.
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            _ = load_tick.tick() => {
                if serves_load_following(&cluster, &views.borrow()) {
                    cluster.adverts.ask_figures();
                }
                continue;
            }
            changed = views.changed() => {
                if changed.is_err() {
                    break;
                }
                false
            }
        };
        if cluster.gossip.is_closed() {
            break;
        }
        if ticked {
            cluster.adverts.ask();
        }
        // A node that is leaving is placed nowhere: it loads nothing more, and what it has
        // loaded serves until it stops.
        if cluster.is_departing() {
            continue;
        }
        let view = views.borrow_and_update().clone();
        if view.plan.epoch != epoch.0 {
            epoch = (view.plan.epoch, Instant::now());
        }
        let settled = ticked && epoch.1.elapsed() >= SETTLE;
        follow_plan(&cluster, &view, settled);
        if !ticked {
            continue;
        }
        let this = cluster.clone();
        let due = view.clone();
        let wanted = tokio::task::spawn_blocking(move || this.endpoints_to_fetch(&due))
            .await
            .unwrap_or_default();
        for entry in wanted {
            if cluster
                .arriving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(entry.name.clone())
            {
                tokio::spawn(arrive_endpoint(cluster.clone(), entry));
            }
        }
    }
}

/// Whether this node serves a model whose replica count follows load.
fn serves_load_following(cluster: &Cluster, view: &MeshView) -> bool {
    !view.scaling.is_empty() && {
        let serving = cluster.engine.loaded_models();
        view.scaling.iter().any(|s| serving.contains(&s.model))
    }
}

/// Starts loading every model the plan puts here that is not loaded (and fits the memory
/// budget: one that does not is declined, and the advert says so); when `settled`, unloads
/// those it no longer puts here that another replica serves, and takes back declined models
/// that fit again.
fn follow_plan(cluster: &Arc<Cluster>, view: &MeshView, settled: bool) {
    let loaded: BTreeSet<String> = cluster.engine.loaded_models().into_iter().collect();
    let arriving = cluster
        .arriving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // What is loaded or loading keeps its share of the budget before anything new is placed.
    let mut placed_here: Vec<&str> = view
        .plan
        .routes
        .iter()
        .filter(|r| r.replicas.iter().any(|x| x.node == cluster.name))
        .map(|r| r.model.as_str())
        .collect();
    placed_here.sort_by_key(|m| (!(loaded.contains(*m) || arriving.contains(*m)), *m));
    let mut held: Vec<(String, u64)> = Vec::new();
    let mut declines_changed = false;
    for model in placed_here {
        let files = files_of(view, model).unwrap_or(0);
        if let Err(reason) = cluster.memory.admit(model, files, &held) {
            if let Some(why) = reason {
                tracing::warn!(
                    %model,
                    needs_bytes = why.needs,
                    used_bytes = why.used,
                    budget_bytes = why.budget,
                    "placement: declined; the model would take this node past its memory budget for models"
                );
                declines_changed = true;
            }
            continue;
        }
        held.push((model.to_string(), files));
        if !loaded.contains(model)
            && cluster
                .arriving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(model.to_string())
        {
            tokio::spawn(arrive(cluster.clone(), model.to_string()));
        }
    }
    for route in &view.plan.routes {
        let model = route.model.as_str();
        let here = route.replicas.iter().any(|r| r.node == cluster.name);
        let is_loaded = loaded.contains(model);
        if !here && is_loaded && settled && !cluster.is_leaving(model) {
            let others: Vec<&str> = route
                .replicas
                .iter()
                .filter(|r| r.node != cluster.name && view.serving(&r.node, model))
                .map(|r| r.node.as_str())
                .collect();
            if others.is_empty() {
                continue;
            }
            tracing::info!(%model, served_by = ?others, "placement: no longer placed here; unloading");
            tokio::spawn(unload(cluster.clone(), model.to_string()));
        }
    }
    if settled {
        for model in cluster.memory.reconsider(&held, |m| files_of(view, m)) {
            tracing::info!(%model, "placement: a declined model fits the memory budget again");
            declines_changed = true;
        }
    }
    if declines_changed {
        cluster.adverts.ask();
    }
}

/// The size of `model`'s files as its publishers advertise it (the largest, when they
/// differ); `None` when no publisher holds it any more.
fn files_of(view: &MeshView, model: &str) -> Option<u64> {
    view.members
        .iter()
        .filter_map(|m| m.advert.as_ref())
        .filter(|a| view.publishers.includes(&a.node))
        .flat_map(|a| a.catalog.iter())
        .filter(|e| e.model == model)
        .map(|e| e.bytes)
        .max()
}

impl Cluster {
    /// The published endpoints placed here (with their models) whose folder this node lacks,
    /// or holds at an older version it got from the mesh. A folder the operator put here
    /// themselves is never replaced: it serves as it is (logged once).
    fn endpoints_to_fetch(&self, view: &MeshView) -> Vec<EndpointEntry> {
        let root = self.engine.repository().root();
        view.endpoints()
            .filter(|entry| view.placed_on(&entry.model, &self.name))
            .filter(|entry| {
                let folder = root.join(&entry.name);
                if !folder.exists() {
                    return true;
                }
                let local = self.digests.get(root, &entry.name).map(|(d, _)| d);
                if local.as_ref().ok() == Some(&entry.digest) {
                    return false;
                }
                let from_mesh = folder.join(FROM_MESH_MARKER).exists();
                // A publisher's own folder is a source, not a stale copy (its new version
                // may simply not be in the view yet).
                let publishes = view.publishers.includes(&self.name);
                if !from_mesh && !publishes && self.first_report(&entry.name, "own version") {
                    crate::warn_throttled!(endpoint = %entry.name, "this node's own endpoint folder differs from the publisher's version; it serves its own");
                }
                from_mesh
            })
            .cloned()
            .collect()
    }
}

/// Fetches an endpoint's folder placed here (with its model), replacing an older version
/// from the mesh; the node's endpoint watcher then swaps the new endpoint in as a whole.
async fn arrive_endpoint(cluster: Arc<Cluster>, entry: EndpointEntry) {
    if let Ok(_slot) = cluster.arrivals.acquire().await {
        let view = cluster.view();
        let still = view
            .endpoint(&entry.name)
            .is_some_and(|e| *e == entry && view.placed_on(&e.model, &cluster.name));
        if still {
            let holders = endpoint_holders(&view, &entry);
            if let Err(e) = fetch(&cluster, holders, Install::Replace).await {
                tracing::warn!(endpoint = %entry.name, error = %e, "placement: cannot fetch the endpoint's folder yet");
            }
        }
    }
    cluster
        .arriving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&entry.name);
}

/// Stops advertising `model`, gives peers [`UNADVERTISE_GRACE`] to notice, then unloads it
/// (draining its queue) unless placement brought it back meanwhile.
async fn unload(cluster: Arc<Cluster>, model: String) {
    cluster.set_leaving(&model, true);
    cluster.publish_advert().await;
    tokio::time::sleep(UNADVERTISE_GRACE).await;
    if cluster.view().placed_on(&model, &cluster.name) {
        tracing::info!(%model, "placement: placed here again; keeping it");
    } else {
        let engine = cluster.engine.clone();
        let name = model.clone();
        match tokio::task::spawn_blocking(move || engine.unload(&name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%model, error = %e, "placement: unload failed"),
            Err(e) => tracing::error!(%model, error = %e, "placement: unload panicked"),
        }
    }
    cluster.set_leaving(&model, false);
    cluster.publish_advert().await;
}

/// Fetches and loads a model placed here, off the housekeeping loop (a large model takes a
/// while, and adverts must go on meanwhile), at most [`super::MAX_ARRIVALS`] at once.
async fn arrive(cluster: Arc<Cluster>, model: String) {
    if let Ok(_slot) = cluster.arrivals.acquire().await {
        // The plan may have moved while this waited its turn.
        let view = cluster.view();
        if view.placed_on(&model, &cluster.name) {
            load(&cluster, &view, &model).await;
        }
    }
    cluster
        .arriving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&model);
}

/// Loads `model`, fetching its files first when this node lacks them.
async fn load(cluster: &Arc<Cluster>, view: &MeshView, model: &str) {
    let repository = cluster.engine.repository();
    if repository.versions(model).is_empty()
        && let Err(e) = fetch(cluster, holders(view, model), Install::New).await
    {
        tracing::warn!(%model, error = %e, "placement: cannot fetch the model's files yet");
        return;
    }
    tracing::info!(%model, epoch = format!("{:016x}", view.plan.epoch), "placement: loading");
    let engine = cluster.engine.clone();
    let name = model.to_string();
    let before = memory::resident_bytes();
    match tokio::task::spawn_blocking(move || engine.load(&name)).await {
        Ok(Ok(())) => {
            if let Some((before, after)) = before.zip(memory::resident_bytes()) {
                let files = files_of(view, model).unwrap_or(0);
                cluster
                    .memory
                    .loaded(model, files, after.saturating_sub(before));
            }
            cluster.publish_advert().await
        }
        Ok(Err(e)) => tracing::error!(%model, error = %e, "placement: load failed"),
        Err(e) => tracing::error!(%model, error = %e, "placement: load panicked"),
    }
}

/// The publishers that hold `model`'s files, each with its catalog entry (digest and size):
/// those serving it first, then by name. Each is asked for its own digest over a connection
/// whose certificate names it, so what is installed is what one identified publisher holds,
/// never a version that other members could offer or vote in.
fn holders<'a>(view: &'a MeshView, model: &'a str) -> Vec<(&'a NodeAdvert, FolderVersion<'a>)> {
    let mut holders: Vec<(&NodeAdvert, FolderVersion)> = view
        .members
        .iter()
        .filter_map(|m| m.advert.as_ref())
        .filter(|advert| view.publishers.includes(&advert.node))
        .filter_map(|advert| {
            let entry = advert.catalog.iter().find(|e| e.model == model)?;
            let version = FolderVersion {
                name: &entry.model,
                digest: entry.digest,
                bytes: entry.bytes,
            };
            Some((advert, version))
        })
        .collect();
    holders.sort_by_key(|(advert, _)| (!advert.serving.iter().any(|s| s == model), &advert.node));
    holders
}

/// The publishers that hold `entry`'s folder at exactly its published digest, by name.
fn endpoint_holders<'a>(
    view: &'a MeshView,
    entry: &'a EndpointEntry,
) -> Vec<(&'a NodeAdvert, FolderVersion<'a>)> {
    view.members
        .iter()
        .filter_map(|m| m.advert.as_ref())
        .filter(|advert| view.publishers.includes(&advert.node))
        .filter(|advert| advert.endpoints.iter().any(|e| e == entry))
        .map(|advert| {
            let version = FolderVersion {
                name: &entry.name,
                digest: entry.digest,
                bytes: entry.bytes,
            };
            (advert, version)
        })
        .collect()
}

/// One version of a repository folder, a model's or an endpoint's, as a holder advertises it.
#[derive(Debug, Clone, Copy)]
struct FolderVersion<'a> {
    name: &'a str,
    digest: [u8; 32],
    bytes: u64,
}

/// Whether a fetched folder may replace one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    /// Only where there is none (models: a node does not replace a model it holds).
    New,
    /// In one step over an older version (endpoints follow their publisher).
    Replace,
}

/// Why fetching from one holder failed.
enum FetchFailure {
    /// For good at this digest (it holds another version, or will not serve it): not asked
    /// again for [`REFUSAL_MEMORY`].
    Refused(String),
    /// For now (a timeout, a busy or vanished holder, files that did not verify).
    Failed(String),
}

async fn fetch(
    cluster: &Arc<Cluster>,
    holders: Vec<(&NodeAdvert, FolderVersion<'_>)>,
    install: Install,
) -> Result<(), String> {
    let mut last = String::from("no other live member holds its files");
    for (holder, version) in holders.into_iter().filter(|(h, _)| h.node != cluster.name) {
        let key = (
            holder.node.clone(),
            version.name.to_string(),
            version.digest,
        );
        {
            let mut refused = cluster
                .refused_fetches
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            refused.retain(|_, at| at.elapsed() < REFUSAL_MEMORY);
            if refused.contains_key(&key) {
                last = format!("{} refused it recently", holder.node);
                continue;
            }
        }
        match fetch_from(cluster, holder, version, install).await {
            Ok(()) => return Ok(()),
            Err(FetchFailure::Refused(why)) => {
                cluster
                    .refused_fetches
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, Instant::now());
                last = format!("{}: {why}", holder.node);
            }
            Err(FetchFailure::Failed(why)) => last = format!("{}: {why}", holder.node),
        }
    }
    Err(last)
}

/// Runs a step of a transfer that touches the disk off the async threads.
async fn on_disk<T: Send + 'static>(
    step: impl FnOnce() -> Result<T, bundle::BundleError> + Send + 'static,
) -> Result<T, FetchFailure> {
    match tokio::task::spawn_blocking(step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(FetchFailure::Failed(e.to_string())),
        Err(e) => Err(FetchFailure::Failed(e.to_string())),
    }
}

/// Fetches `version`'s folder from `holder` in chunks into a staging folder, resuming what an
/// earlier attempt left there, and moves it into place once it hashes to the digest. Memory
/// stays at one chunk whatever the folder's size.
async fn fetch_from(
    cluster: &Arc<Cluster>,
    holder: &NodeAdvert,
    entry: FolderVersion<'_>,
    install: Install,
) -> Result<(), FetchFailure> {
    let model = entry.name;
    let ask = |request: Message| async move {
        match cluster
            .endpoint
            .call_node(holder.quic, &holder.node, &request, FETCH_CALL_TIMEOUT)
            .await
        {
            Ok(Message::Failure(f)) => Err(f),
            Ok(answer) => Ok(answer),
            Err(e) => Err(Failure::new(FailureClass::Unavailable, e.to_string())),
        }
    };
    let request = Message::FetchManifest(FetchModel {
        model: model.to_string(),
        digest: entry.digest,
    });
    let manifest = match ask(request).await {
        Ok(Message::Manifest(manifest)) => manifest,
        Ok(other) => return Err(FetchFailure::Failed(format!("answered {}", other.kind()))),
        Err(f) if f.class == FailureClass::NotFound => {
            return Err(FetchFailure::Refused(f.message));
        }
        Err(f) => return Err(FetchFailure::Failed(f.message)),
    };
    let total = manifest
        .files
        .iter()
        .fold(0u64, |sum, f| sum.saturating_add(f.size));
    if manifest.model != model || manifest.digest != entry.digest || total != entry.bytes {
        return Err(FetchFailure::Refused(format!(
            "its manifest ({} files, {total} bytes) does not match its advert ({} bytes)",
            manifest.files.len(),
            entry.bytes
        )));
    }
    let root = cluster.engine.repository().root().to_path_buf();
    let staging = on_disk(move || bundle::Staging::open(&root, &manifest)).await?;
    let chunk = CHUNK_BYTES.min(cluster.endpoint.max_frame_bytes() as u64 / 2);
    let started = Instant::now();
    let resumed_at = {
        let staging = staging.clone();
        on_disk(move || Ok(staging.progress().0)).await?
    };
    tracing::info!(%model, from = %holder.node, bytes = total, resumed_at, digest = %bundle::hex(&entry.digest), "placement: fetching the model's files");
    let mut busy = 0;
    loop {
        let next = {
            let staging = staging.clone();
            on_disk(move || staging.next_wanted(chunk)).await?
        };
        let Some(wanted) = next else { break };
        let request = Message::FetchChunk(FetchChunk {
            model: model.to_string(),
            digest: entry.digest,
            path: wanted.path.clone(),
            offset: wanted.offset,
            // At most `chunk`, which is at most CHUNK_BYTES.
            length: wanted.length as u32,
        });
        match ask(request).await {
            Ok(Message::Chunk(data)) => {
                busy = 0;
                let staging = staging.clone();
                on_disk(move || staging.write(&wanted, &data)).await?;
            }
            Ok(other) => return Err(FetchFailure::Failed(format!("answered {}", other.kind()))),
            Err(f) if busy < BUSY_WAITS && f.retry_after_ms.is_some() => {
                busy += 1;
                let wait =
                    Duration::from_millis(f.retry_after_ms.unwrap_or(1000)).min(MAX_BUSY_WAIT);
                tokio::time::sleep(wait).await;
            }
            // What is staged stays for the next attempt, from this holder or another.
            Err(f) => return Err(FetchFailure::Failed(f.message)),
        }
    }
    on_disk(move || match install {
        Install::New => staging.finish(),
        Install::Replace => staging.finish_replacing(),
    })
    .await?;
    tracing::info!(
        %model,
        from = %holder.node,
        bytes = total,
        resumed_at,
        digest = %bundle::hex(&entry.digest),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "placement: fetched the model's files"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{LiveMember, MemberId};
    use crate::placement::Publishers;
    use crate::wire::CatalogEntry;

    fn member(node: &str, port: u16, digest: u8, serving: bool) -> LiveMember {
        let quic = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        LiveMember {
            id: MemberId {
                name: node.into(),
                addr: quic,
                generation: 1,
            },
            suspect: false,
            advert: Some(NodeAdvert {
                catalog: vec![CatalogEntry {
                    model: "fraud".into(),
                    replicas: 1,
                    digest: [digest; 32],
                    bytes: 1,
                    scaling: None,
                }],
                serving: if serving {
                    vec!["fraud".into()]
                } else {
                    vec![]
                },
                ..NodeAdvert::empty(node, quic)
            }),
        }
    }

    #[test]
    fn the_files_come_from_a_serving_holder_with_its_own_digest_not_a_vote() {
        // Three members that joined with another version of fraud do not outvote the one
        // member serving it.
        let members = vec![
            member("x1", 1, 0xee, false),
            member("x2", 2, 0xee, false),
            member("x3", 3, 0xee, false),
            member("owner", 4, 0x01, true),
        ];
        let order = |view: &MeshView| -> Vec<(String, u8)> {
            holders(view, "fraud")
                .iter()
                .map(|(advert, entry)| (advert.node.clone(), entry.digest[0]))
                .collect()
        };
        let open = MeshView::from_members(members.clone(), &Publishers::Anyone, Vec::new());
        assert_eq!(
            order(&open),
            [("owner", 0x01), ("x1", 0xee), ("x2", 0xee), ("x3", 0xee)]
                .map(|(n, d)| (n.to_string(), d))
                .to_vec()
        );
        assert!(holders(&open, "other").is_empty());
        // With publishers named, nobody else is asked at all, serving or not, first by name
        // or not: a member named "0evil" holding its own fraud is never a source.
        let mut with_evil = members;
        with_evil.push(member("0evil", 5, 0x66, true));
        let only = Publishers::Only(["owner".to_string()].into());
        assert_eq!(
            order(&MeshView::from_members(with_evil, &only, Vec::new())),
            vec![("owner".to_string(), 0x01)]
        );
    }
}
