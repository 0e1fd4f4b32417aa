//! `meshserve status`: the mesh as one node sees it, with every member's load.

use crate::cli::{client_identity, current_thread_runtime};
use anyhow::Result;
use clap::Args;
use meshserve::client::{ClientConfig, MeshClient};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Any node's mesh (QUIC) address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7000")]
    node: SocketAddr,
    /// Folder made by `meshserve certs`.
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// The client certificate to use (`client-<NAME>.pem` in the folder).
    #[arg(long, default_value = "ops")]
    client: String,
    /// Print the raw status as JSON.
    #[arg(long)]
    json: bool,
    /// How long the node and each member have to answer; a member that does not is shown as
    /// such, with its load unknown.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

pub(crate) fn status(args: StatusArgs) -> Result<()> {
    let identity = client_identity(&args.certs, &args.client)?;
    let runtime = current_thread_runtime()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let (status, loads, silent) = runtime.block_on(async {
        let mut config = ClientConfig::new(vec![args.node], identity);
        config.timeout = timeout;
        let client = std::sync::Arc::new(MeshClient::new(config)?);
        let first = client.status(args.node).await?;
        // Each member reports its own load, all asked at once, each within the timeout.
        let mut asks = tokio::task::JoinSet::new();
        for advert in first.members.iter().filter_map(|m| m.advert.as_ref()) {
            let (client, quic, node) = (client.clone(), advert.quic, advert.node.clone());
            asks.spawn(async move { (node, client.loads(quic).await) });
        }
        let mut loads = Vec::new();
        let mut silent = Vec::new();
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok((_, Ok(load))) => loads.push(load),
                Ok((node, Err(e))) => {
                    tracing::debug!(%node, error = %e, "no load report");
                    silent.push(node);
                }
                Err(e) => eprintln!("a member's load is unknown: {e}"),
            }
        }
        loads.sort_by(|a, b| a.node.cmp(&b.node));
        silent.sort();
        // The view as of the answer, not from before the wait: members may have come, gone
        // or been suspected meanwhile.
        let status = client.status(args.node).await.unwrap_or(first);
        Ok::<_, meshserve::client::ClientError>((status, loads, silent))
    })?;
    if args.json {
        let mut json = serde_json::to_value(&status)?;
        json["loads"] = serde_json::to_value(&loads)?;
        json["no_answer"] = serde_json::to_value(&silent)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!(
            "{}",
            meshserve::cluster::format_status(&status, &loads, &silent)
        );
    }
    Ok(())
}
