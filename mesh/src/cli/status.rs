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
}

pub(crate) fn status(args: StatusArgs) -> Result<()> {
    let identity = client_identity(&args.certs, &args.client)?;
    let runtime = current_thread_runtime()?;
    let (status, loads) = runtime.block_on(async {
        let mut config = ClientConfig::new(vec![args.node], identity);
        config.timeout = Duration::from_secs(5);
        let client = std::sync::Arc::new(MeshClient::new(config)?);
        let status = client.status(args.node).await?;
        // Each member reports its own load; one that does not answer shows as unknown.
        let mut asks = tokio::task::JoinSet::new();
        for advert in status.members.iter().filter_map(|m| m.advert.as_ref()) {
            let (client, quic) = (client.clone(), advert.quic);
            asks.spawn(async move { client.loads(quic).await });
        }
        let mut loads = Vec::new();
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok(Ok(load)) => loads.push(load),
                Ok(Err(e)) => eprintln!("a member's load is unknown: {e}"),
                Err(e) => eprintln!("a member's load is unknown: {e}"),
            }
        }
        loads.sort_by(|a, b| a.node.cmp(&b.node));
        Ok::<_, meshserve::client::ClientError>((status, loads))
    })?;
    if args.json {
        let mut json = serde_json::to_value(&status)?;
        json["loads"] = serde_json::to_value(&loads)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", meshserve::cluster::format_status(&status, &loads));
    }
    Ok(())
}
