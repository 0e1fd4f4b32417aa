//! `meshserve certs`: the mesh CA and the certificates of nodes, clients and front doors.

use anyhow::Result;
use clap::Args;
use meshserve::transport::certs::{MeshCa, Role};
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct CertsArgs {
    /// Folder for the CA and the certificates.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Issue a node certificate for this node name (repeatable).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
    /// Issue a client certificate for this client name (repeatable).
    #[arg(long = "client", value_name = "NAME")]
    clients: Vec<String>,
    /// Issue the front-door (HTTP/3, HTTPS) certificate `server.pem` for this DNS name or IP
    /// (repeatable: one certificate names them all).
    #[arg(long = "server", value_name = "NAME")]
    servers: Vec<String>,
    /// Days the issued certificates are valid (the CA itself: 10 years).
    #[arg(long, default_value_t = meshserve::transport::certs::DEFAULT_VALIDITY_DAYS)]
    valid_days: u32,
}

pub(crate) fn certs(args: CertsArgs) -> Result<()> {
    let (ca, created) = MeshCa::open_or_create(&args.dir)?;
    let ca = ca.with_validity_days(args.valid_days);
    let ca_path = args.dir.join("ca.pem");
    if created {
        println!("created mesh CA {}", ca_path.display());
    } else {
        println!("using mesh CA {}", ca_path.display());
    }
    for name in &args.nodes {
        let path = ca.issue_to(&args.dir, Role::Node, name)?;
        println!(
            "issued node certificate {} (node {name} needs only the folder {}; a running node reloads it on SIGHUP)",
            path.display(),
            meshserve::transport::certs::node_dir(&args.dir, name).display()
        );
    }
    for name in &args.clients {
        let path = ca.issue_to(&args.dir, Role::Client, name)?;
        println!("issued client certificate {}", path.display());
    }
    if !args.servers.is_empty() {
        let path = ca.issue_server_to(&args.dir, &args.servers)?;
        println!(
            "issued server certificate {} for {}",
            path.display(),
            args.servers.join(", ")
        );
    }
    Ok(())
}
