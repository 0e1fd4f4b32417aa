//! `meshserve plugin watch`: builds the project, then again whenever one of its sources
//! changes, and (with `--endpoint`) asks the node to swap the new build in at once, printing
//! whether it did or kept the previous version. Without `--endpoint` the node still picks the
//! new file up by itself within its file-check interval.

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::build::{Language, build};

#[derive(Args)]
pub(super) struct WatchArgs {
    /// The project folder.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// After each successful build, reload this endpoint of the node at `--node`.
    #[arg(long)]
    endpoint: Option<String>,
    /// The node's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    node: String,
    /// A file holding the node's admin token (`http.admin_token_file`), if it has one.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// How often to look at the sources, in ms.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

pub(super) fn watch(args: WatchArgs) -> Result<()> {
    let language = Language::of(&args.dir)?;
    let token = args
        .admin_token_file
        .as_deref()
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .with_context(|| format!("cannot read {}", path.display()))
        })
        .transpose()?;
    let runtime = crate::cli::current_thread_runtime()?;
    let mut seen = sources_stamp(&args.dir, language);
    loop {
        match build(&args.dir) {
            Ok(_) => {
                if let Some(endpoint) = &args.endpoint {
                    let reload = reload(&args.node, endpoint, token.as_deref());
                    match runtime.block_on(reload) {
                        Ok(answer) => println!("{answer}"),
                        Err(e) => eprintln!("reload of '{endpoint}' failed: {e:#}"),
                    }
                }
            }
            Err(e) => eprintln!("{e:#}"),
        }
        println!("watching {} for changes", args.dir.display());
        // A save often writes several files: build once they have settled for one poll.
        loop {
            std::thread::sleep(Duration::from_millis(args.poll_ms));
            let now = sources_stamp(&args.dir, language);
            if now != seen {
                seen = now;
                std::thread::sleep(Duration::from_millis(args.poll_ms));
                let settled = sources_stamp(&args.dir, language);
                if settled == seen {
                    break;
                }
                seen = settled;
            }
        }
    }
}

/// `POST /v1/endpoints/{endpoint}/reload`; the node's answer as one line.
async fn reload(node: &str, endpoint: &str, token: Option<&str>) -> Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let mut request = http::Request::post(format!(
        "{}/v1/endpoints/{endpoint}/reload",
        node.trim_end_matches('/')
    ));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::default())?;
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .context("the node did not answer within 60 s")??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    if status.is_success() {
        Ok(format!("endpoint '{endpoint}' reloaded: {body}"))
    } else {
        anyhow::bail!("{status}: {body}")
    }
}

/// The newest modification time and the count of the project's source files: anything but
/// build output, caches and hidden files.
fn sources_stamp(dir: &Path, language: Language) -> (Option<SystemTime>, usize) {
    let mut newest = None;
    let mut count = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" || name == "__pycache__" {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if is_source(&name, language) {
                count += 1;
                newest = newest.max(meta.modified().ok());
            }
        }
    }
    (newest, count)
}

fn is_source(name: &str, language: Language) -> bool {
    match language {
        Language::Rust => {
            name.ends_with(".rs") || name.ends_with(".wit") || name.starts_with("Cargo.")
        }
        Language::Python => name.ends_with(".py") || name.ends_with(".wit"),
    }
}
