//! `meshserve plugin run`: one component called in the node's own sandbox (the same runtime,
//! limits and host functions), without a model or a node; it prints what the component
//! returned, how long it took, and the limit it hit if it failed.

use crate::cli::multi_thread_runtime;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use meshserve::oip::{OutputEncoding, decode_request, encode_response};
use meshserve_host::metrics::Metrics;
use meshserve_host::plugin::features::{FeatureTableConfig, FeatureTables};
use meshserve_host::plugin::instance::{LoadedPlugin, PluginReply, PostAnswer, PreAnswer, Stage};
use meshserve_host::plugin::runtime::{PluginRuntime, PluginRuntimeConfig};
use meshserve_host::plugin::spec::PluginSpec;
use meshserve_host::plugin::views::{ContextView, RequestView};
use meshserve_host::request::InferResponse;
use meshserve_host::tensor::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub(super) struct RunArgs {
    /// The component (`.wasm`, built for wasm32-wasip2).
    file: PathBuf,
    /// The stage to call.
    #[arg(long, value_enum)]
    stage: StageArg,
    /// The string the plugin's `init` receives.
    #[arg(long, default_value = "")]
    config: String,
    /// The request body the pre stage reads: the text itself, or @FILE.
    #[arg(long, default_value = "")]
    body: String,
    /// The request's Content-Type.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// A request header, `NAME: VALUE` (repeatable); the plugin is granted each one.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The model's outputs the post stage receives, as OIP JSON (a model's answer,
    /// `{"outputs": [...]}`, or `{"inputs": [...]}`): the text itself, or @FILE.
    #[arg(long)]
    outputs: Option<String>,
    /// A feature table the plugin may look up, `NAME=FILE` (CSV or Parquet; repeatable).
    #[arg(long = "table", value_name = "NAME=FILE")]
    tables: Vec<String>,
    /// Running time per call, in ms (the plugin entry's `deadline_ms`).
    #[arg(long, default_value_t = 50)]
    deadline_ms: u64,
    /// Linear memory of the instance, in bytes (the plugin entry's `memory_bytes`).
    #[arg(long)]
    memory_bytes: Option<usize>,
    /// Cache the compiled component in this folder (as the node's `plugins.cache_dir`), so the
    /// next run of the same file starts without compiling: worth it for large components such
    /// as Python's.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// How many calls to make on the warm instance; the timing covers them all.
    #[arg(long, default_value_t = 1)]
    calls: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum StageArg {
    Pre,
    Post,
}

pub(super) fn run(args: RunArgs) -> Result<()> {
    let runtime = multi_thread_runtime(Some(1), "meshserve-plugin")?;
    let stage = match args.stage {
        StageArg::Pre => Stage::Pre,
        StageArg::Post => Stage::Post,
    };
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("--header '{h}' is not NAME: VALUE"))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = PluginSpec::new(args.file.clone());
    spec.config = args.config.clone();
    spec.deadline_ms = args.deadline_ms;
    spec.debug = true;
    spec.headers = headers.iter().map(|(name, _)| name.clone()).collect();
    if let Some(bytes) = args.memory_bytes {
        spec.memory_bytes = bytes;
    }
    let tables = feature_tables(&args.tables)?;
    let plugins = PluginRuntime::new(
        PluginRuntimeConfig {
            cache_dir: args.cache_dir.clone(),
            ..PluginRuntimeConfig::default()
        },
        Arc::new(tables),
        Arc::new(Metrics::new()),
    )?;
    let name = args
        .file
        .file_stem()
        .map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
    let started = Instant::now();
    let loaded = plugins.load(&name, stage, &spec, None)?;
    let _context = runtime.enter();
    runtime
        .block_on(loaded.warm_up())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{} ({} stage, sha256 {}) loaded and initialised in {} ms",
        args.file.display(),
        stage.as_str(),
        loaded.digest(),
        started.elapsed().as_millis()
    );
    let call = Call {
        body: Bytes::from(text_or_file(&args.body)?),
        content_type: args.content_type.clone(),
        headers,
        outputs: match (&args.outputs, stage) {
            (Some(outputs), _) => model_outputs(&text_or_file(outputs)?)?,
            (None, Stage::Post) => bail!("the post stage needs the model's outputs: --outputs"),
            (None, Stage::Pre) => Vec::new(),
        },
    };
    let mut times = Vec::new();
    let mut answer = None;
    for _ in 0..args.calls.max(1) {
        let started = Instant::now();
        let outcome = runtime.block_on(call.once(&loaded, stage));
        times.push(started.elapsed());
        answer = Some(outcome.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    if let Some(answer) = answer {
        print_answer(answer, stage);
    }
    times.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{} call(s): p50 {:.1} µs, slowest {:.1} µs (wall-clock, this machine)",
        times.len(),
        micros(times[times.len() / 2]),
        micros(times[times.len() - 1])
    );
    Ok(())
}

/// One call's inputs.
struct Call {
    body: Bytes,
    content_type: String,
    headers: Vec<(String, String)>,
    outputs: Vec<Tensor>,
}

/// What a call returned, of either stage.
enum Answer {
    Tensors(Vec<Tensor>),
    Reply(PluginReply),
}

impl Call {
    async fn once(&self, plugin: &LoadedPlugin, stage: Stage) -> Result<Answer, String> {
        let failed = |e: meshserve_host::plugin::instance::PluginFailure| e.to_string();
        match stage {
            Stage::Pre => {
                let request = RequestView::new(
                    "run",
                    &self.content_type,
                    self.headers.clone(),
                    self.body.clone(),
                );
                match plugin.preprocess(request).await.map_err(failed)? {
                    PreAnswer::Infer(tensors) => Ok(Answer::Tensors(tensors)),
                    PreAnswer::Reply(reply) => Ok(Answer::Reply(reply)),
                }
            }
            Stage::Post => {
                let context =
                    ContextView::new("run", "model", &self.content_type, self.headers.clone());
                match plugin
                    .postprocess(context, &self.outputs)
                    .await
                    .map_err(failed)?
                {
                    PostAnswer::Tensors(tensors) => Ok(Answer::Tensors(tensors)),
                    PostAnswer::Reply(reply) => Ok(Answer::Reply(reply)),
                }
            }
        }
    }
}

fn print_answer(answer: Answer, stage: Stage) {
    match answer {
        Answer::Tensors(tensors) => {
            // The pre stage's tensors as an OIP request the model would take, the post
            // stage's as the answer a client would get.
            let key = match stage {
                Stage::Pre => "inputs",
                Stage::Post => "outputs",
            };
            println!("tensors ({} of them), as OIP JSON:", tensors.len());
            println!("{}", tensors_json(tensors, key));
        }
        Answer::Reply(reply) => {
            println!("reply {} {}", reply.status, reply.content_type);
            for (name, value) in &reply.headers {
                println!("{name}: {value}");
            }
            println!();
            println!("{}", String::from_utf8_lossy(&reply.body));
        }
    }
}

/// `{"<key>": [...]}` in OIP JSON.
fn tensors_json(tensors: Vec<Tensor>, key: &str) -> String {
    let response = InferResponse {
        model_name: String::new(),
        model_version: String::new(),
        id: None,
        outputs: tensors,
        timings: Default::default(),
    };
    let encoded = encode_response(&response, &OutputEncoding::Json);
    let parsed: serde_json::Value = serde_json::from_slice(&encoded.body).unwrap_or_default();
    serde_json::json!({ key: parsed["outputs"] }).to_string()
}

/// A model's outputs from OIP JSON, as a model answers (`outputs`) or as a request (`inputs`).
fn model_outputs(json: &[u8]) -> Result<Vec<Tensor>> {
    let mut value: serde_json::Value =
        serde_json::from_slice(json).context("--outputs is not JSON")?;
    if let Some(outputs) = value.get_mut("outputs").map(serde_json::Value::take) {
        value = serde_json::json!({ "inputs": outputs });
    }
    let body = Bytes::from(value.to_string());
    let decoded = decode_request("model", None, &body, None)
        .map_err(|e| anyhow::anyhow!("--outputs: {}", e.0))?;
    Ok(decoded.request.inputs)
}

fn feature_tables(tables: &[String]) -> Result<FeatureTables> {
    let configs = tables
        .iter()
        .map(|t| {
            let (name, path) = t
                .split_once('=')
                .with_context(|| format!("--table '{t}' is not NAME=FILE"))?;
            let config = FeatureTableConfig {
                path: path.into(),
                key_column: None,
                format: Default::default(),
            };
            Ok((name.to_string(), config))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(FeatureTables::load(&configs)?)
}

/// An argument's text, or the contents of the file it names after `@`.
fn text_or_file(argument: &str) -> Result<Vec<u8>> {
    match argument.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}")),
        None => Ok(argument.as_bytes().to_vec()),
    }
}
