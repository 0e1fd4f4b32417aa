//! The model repository over HTTP (Triton's extension): the index, and loading and unloading a
//! model by name (admin authority).

use crate::http::body::LimitedBody;
use crate::http::error::ApiError;
use crate::http::respond::json_response;
use crate::http::state::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use meshserve_host::ErrorClass;
use meshserve_host::engine::{IndexEntry, ModelLoadError};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// The body of Triton's load and unload requests (`tritonclient` sends `{}`, or parameters).
#[derive(Deserialize, Default)]
struct RepositoryRequest {
    #[serde(default)]
    parameters: serde_json::Map<String, Value>,
}

/// Refuses what the node cannot honour rather than ignoring it: a model's configuration and
/// files come from its folder in the repository.
pub(crate) fn check_parameters<'k>(
    model: &str,
    mut keys: impl Iterator<Item = &'k str>,
) -> Result<(), ApiError> {
    match keys.find(|k| *k == "config" || k.starts_with("file:")) {
        Some(key) => Err(ApiError::new(
            ErrorClass::InvalidInput,
            format!(
                "load parameter '{key}' is not supported: change the files in the repository folder of '{model}' instead"
            ),
        )),
        None => Ok(()),
    }
}

pub(crate) async fn repository_index(
    State(state): State<AppState>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let filter: IndexRequest = body.json_or_default("index request")?;
    Ok(json_response(&Value::Array(
        index(&state, filter.ready).await?,
    )))
}

/// The repository's models as Triton's index lists them (name, version, state, reason); only
/// the ready ones with `ready_only`.
pub(crate) async fn index(state: &AppState, ready_only: bool) -> Result<Vec<Value>, ApiError> {
    let engine = state.engine().clone();
    let index = tokio::task::spawn_blocking(move || engine.index())
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))?;
    Ok(index
        .iter()
        .filter(|e| e.ready || !ready_only)
        .flat_map(index_rows)
        .collect())
}

fn index_rows(entry: &IndexEntry) -> Vec<Value> {
    if entry.versions.is_empty() {
        return vec![json!({ "name": entry.name, "state": "UNAVAILABLE", "reason": entry.reason })];
    }
    entry
        .versions
        .iter()
        .map(|v| json!({ "name": entry.name, "version": v.to_string(), "state": "READY", "reason": "" }))
        .collect()
}

pub(crate) async fn load_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let request = body.json_or_default::<RepositoryRequest>("load request")?;
    check_parameters(&model, request.parameters.keys().map(String::as_str))?;
    load(&state, model).await?;
    Ok(json_response(&json!({})))
}

/// Loads (or reloads) `model` from the repository.
pub(crate) async fn load(state: &AppState, model: String) -> Result<(), ApiError> {
    let engine = state.engine().clone();
    let name = model.clone();
    tokio::task::spawn_blocking(move || engine.load(&name))
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))?
        .map_err(|e| {
            let class = match e {
                ModelLoadError::NotInRepository { .. } => ErrorClass::NotFound,
                _ => ErrorClass::InvalidInput,
            };
            ApiError::new(class, format!("failed to load '{model}': {e}"))
        })
}

pub(crate) async fn unload_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    body.json_or_default::<RepositoryRequest>("unload request")?;
    unload(&state, model).await?;
    Ok(json_response(&json!({})))
}

/// Unloads `model`.
pub(crate) async fn unload(state: &AppState, model: String) -> Result<(), ApiError> {
    // Off the async workers: an unload waits for a load of another model to finish.
    let engine = state.engine().clone();
    tokio::task::spawn_blocking(move || engine.unload(&model))
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))??;
    Ok(())
}
