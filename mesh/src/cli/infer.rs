//! `meshserve infer`: requests to a model or an endpoint through a route-aware client (HTTP/3,
//! or `meshserve/1` with `--mesh`), printing each answer, who served it and the route learnt.

use crate::cli::{client_identity, current_thread_runtime};
use anyhow::{Context, Result};
use clap::Args;
use meshserve::client::http3::{Http3Client, Http3ClientConfig};
use meshserve::client::{ClientConfig, MeshClient};
use meshserve::dispatch::timing::Ms;
use meshserve::oip::{self, OutputEncoding};
use meshserve::wire::RouteHint;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct InferArgs {
    /// Any node's HTTP/3 address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    http3: SocketAddr,
    /// CA certificate that signed the nodes' front-door certificates (HTTP/3).
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// Call over `meshserve/1` instead, through this node's mesh (QUIC) address, with a client
    /// certificate of the mesh (`--certs`, `--client`).
    #[arg(long, value_name = "ADDR:PORT")]
    mesh: Option<SocketAddr>,
    /// Folder made by `meshserve certs` (with `--mesh`).
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// The client certificate to use with `--mesh` (`client-<NAME>.pem` in the folder).
    #[arg(long, default_value = "ops")]
    client: String,
    /// The model to call.
    #[arg(long, default_value = "fraud")]
    model: String,
    /// Call this endpoint instead of a model: `--data` is the body its pre-plugin takes, sent
    /// as it is (the invocations form).
    #[arg(long, value_name = "NAME")]
    endpoint: Option<String>,
    /// The content type of an endpoint's body.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// The request (OIP JSON for a model, any body for an endpoint), or @FILE; default for a
    /// model: generated values shaped after its metadata (dynamic dimensions 1).
    #[arg(long)]
    data: Option<String>,
    /// Requests to send one after another (the second goes where the first one's route hint
    /// points).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

/// One answer as `meshserve infer` prints it.
struct Printed {
    /// `HTTP/3 200 from 127.0.0.1:8444`, or the `meshserve/1` equivalent.
    line: String,
    server_timing: String,
    body: Vec<u8>,
}

pub(crate) fn infer(args: InferArgs) -> Result<()> {
    let runtime = current_thread_runtime()?;
    runtime.block_on(async {
        let client = Client::connect(&args)?;
        let body = match &args.data {
            Some(file) if file.starts_with('@') => {
                std::fs::read(&file[1..]).with_context(|| format!("request file {}", &file[1..]))?
            }
            Some(json) => json.clone().into_bytes(),
            None if args.endpoint.is_some() => {
                anyhow::bail!("an endpoint takes the body its plugin understands: pass --data")
            }
            None => {
                let metadata = client.metadata(&args).await?;
                let metadata: serde_json::Value = serde_json::from_slice(&metadata)?;
                let (body, _) = meshserve::client::body::request_from_metadata(&metadata, 1, false)
                    .context("cannot fill the model's inputs from its metadata; pass --data")?;
                body.to_vec()
            }
        };
        let target = args.endpoint.as_deref().unwrap_or(&args.model);
        for _ in 0..args.repeat.max(1) {
            let printed = client.call(&args, &body).await?;
            println!(
                "{} (server-timing: {})",
                printed.line, printed.server_timing
            );
            if let Some(route) = client.route(target) {
                println!("route: {target} lives on {}", client.replicas(&route));
            }
            println!("{}", String::from_utf8_lossy(&printed.body));
        }
        Ok(())
    })
}

/// The route-aware client `infer` talks through.
enum Client {
    Http3(Http3Client),
    /// With the node first asked.
    Mesh(MeshClient, SocketAddr),
}

impl Client {
    fn connect(args: &InferArgs) -> Result<Client> {
        let Some(node) = args.mesh else {
            let config = Http3ClientConfig::new(vec![args.http3], &args.ca).with_context(|| {
                format!(
                    "CA certificate {} (made by `meshserve certs`; scripts/run.sh keeps it in target/demo-certs)",
                    args.ca.display()
                )
            })?;
            return Ok(Client::Http3(Http3Client::new(config)?));
        };
        let identity = client_identity(&args.certs, &args.client)?;
        let client = MeshClient::new(ClientConfig::new(vec![node], identity))?;
        Ok(Client::Mesh(client, node))
    }

    /// The model's OIP metadata, as JSON bytes.
    async fn metadata(&self, args: &InferArgs) -> Result<Vec<u8>> {
        match self {
            Client::Mesh(client, node) => {
                Ok(client.metadata(*node, &args.model).await?.into_bytes())
            }
            Client::Http3(client) => {
                let path = format!("/v2/models/{}", args.model);
                let answer = client
                    .request(
                        args.http3,
                        http::Method::GET,
                        &path,
                        Default::default(),
                        Default::default(),
                    )
                    .await?;
                anyhow::ensure!(
                    answer.status.is_success(),
                    "metadata of '{}': {} {}",
                    args.model,
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
                Ok(answer.body.to_vec())
            }
        }
    }

    async fn call(&self, args: &InferArgs, body: &[u8]) -> Result<Printed> {
        let body = bytes::Bytes::copy_from_slice(body);
        match self {
            Client::Http3(client) => {
                let answer = match &args.endpoint {
                    Some(endpoint) => client.invoke(endpoint, body, &args.content_type).await?,
                    None => client.infer(&args.model, body, None).await?,
                };
                let server_timing = answer
                    .headers
                    .get("server-timing")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                Ok(Printed {
                    line: format!("HTTP/3 {} from {}", answer.status, answer.sent_to),
                    server_timing,
                    body: answer.body.to_vec(),
                })
            }
            Client::Mesh(client, _) => match &args.endpoint {
                Some(endpoint) => {
                    let invoked = client.invoke(endpoint, body, &args.content_type).await?;
                    let answer = invoked.answer;
                    let server_timing = answer
                        .headers
                        .iter()
                        .find(|(name, _)| name == "server-timing")
                        .map_or("-", |(_, value)| value.as_str())
                        .to_string();
                    Ok(Printed {
                        line: format!(
                            "meshserve/1 {} from {}, run by {}",
                            answer.status, invoked.sent_to, answer.node
                        ),
                        server_timing,
                        body: answer.body.to_vec(),
                    })
                }
                None => {
                    let decoded = oip::decode_request(&args.model, None, &body, None)
                        .map_err(|e| anyhow::anyhow!("the request is not OIP JSON: {e}"))?;
                    let answer = client.infer(decoded.request).await?;
                    let t = &answer.response.timings;
                    Ok(Printed {
                        line: format!(
                            "meshserve/1 answer from {}, run by {}",
                            answer.sent_to, answer.served_by
                        ),
                        server_timing: format!(
                            "queue;dur={}, infer;dur={};desc=\"batch {}\"",
                            Ms(t.queue),
                            Ms(t.infer),
                            t.batch_size
                        ),
                        body: oip::encode_response(&answer.response, &OutputEncoding::Json)
                            .body
                            .to_vec(),
                    })
                }
            },
        }
    }

    fn route(&self, target: &str) -> Option<RouteHint> {
        match self {
            Client::Http3(client) => client.route(target),
            Client::Mesh(client, _) => client.route(target),
        }
    }

    /// The replicas of `route`, at the addresses this client uses.
    fn replicas(&self, route: &RouteHint) -> String {
        let replicas: Vec<String> = route
            .replicas
            .iter()
            .map(|r| match self {
                Client::Mesh(..) => format!("{} at {}", r.node, r.quic),
                Client::Http3(_) => match r.http3 {
                    Some(addr) => format!("{} at {addr}", r.node),
                    None => format!("{} (no HTTP/3)", r.node),
                },
            })
            .collect();
        replicas.join(", ")
    }
}
