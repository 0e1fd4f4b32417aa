//! The statistics extension: each model's totals on this node since it started (requests that
//! succeeded and failed, time queued and computed, runs and rows), as Triton reports them and
//! perf_analyzer and tritonclient read them: `GET /v2/models[/{model}[/versions/{v}]]/stats`
//! here, `ModelStatistics` over gRPC ([`crate::http::grpc::service`]).

use crate::http::error::ApiError;
use crate::http::models::{ModelPath, find_version};
use crate::http::respond::json_response;
use crate::http::state::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use meshserve_host::metrics::totals::{Tally, TotalsSnapshot};
use serde_json::{Value, json};

/// One model's (or endpoint's) row of statistics.
pub(crate) struct Row {
    pub(crate) name: String,
    /// The version the figures are reported under; empty for an endpoint.
    pub(crate) version: String,
    /// The model's totals over all its versions here (they are kept per model).
    pub(crate) totals: TotalsSnapshot,
}

impl Row {
    /// Compute input, infer and output. Stacking inputs and splitting outputs happen inside
    /// the run the engine times, so all of it is compute infer; input and output count the
    /// same requests at 0 ns (perf_analyzer requires the three counts to agree).
    pub(crate) fn compute(&self) -> [Tally; 3] {
        let infer = self.totals.compute;
        let around = Tally {
            count: infer.count,
            ns: 0,
        };
        [around, infer, around]
    }
}

/// The rows for `path`: every model loaded here when its name is empty; an endpoint here by
/// its own name (its requests' success and failure); else the model at its version.
pub(crate) fn rows(state: &AppState, path: &ModelPath) -> Result<Vec<Row>, ApiError> {
    let engine = state.engine();
    let row = |name: String, version: String| Row {
        totals: engine.metrics().totals(&name),
        name,
        version,
    };
    if path.model.is_empty() {
        return Ok(engine
            .loaded_models()
            .into_iter()
            .filter_map(|name| engine.model(&name))
            .filter_map(|model| {
                let version = model.version(None).ok()?;
                Some(row(version.name.clone(), version.version.to_string()))
            })
            .collect());
    }
    if state.endpoint(&path.model).is_some() {
        return Ok(vec![row(path.model.clone(), String::new())]);
    }
    let version = find_version(state, path)?;
    Ok(vec![row(version.name.clone(), version.version.to_string())])
}

/// `GET /v2/models/stats`.
pub(crate) async fn all_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let every = ModelPath {
        model: String::new(),
        version: None,
    };
    Ok(json_response(&rows_json(&rows(&state, &every)?)))
}

/// `GET /v2/models/{model}[/versions/{version}]/stats`.
pub(crate) async fn model_stats(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ApiError> {
    Ok(json_response(&rows_json(&rows(&state, &path)?)))
}

fn rows_json(rows: &[Row]) -> Value {
    let duration = |tally: Tally| json!({ "count": tally.count, "ns": tally.ns });
    let none = duration(Tally::default());
    let model_stats: Vec<Value> = rows
        .iter()
        .map(|row| {
            let totals = &row.totals;
            let [input, infer, output] = row.compute();
            json!({
                "name": row.name,
                "version": row.version,
                "last_inference": totals.last_run_ms,
                "inference_count": totals.rows,
                "execution_count": totals.executions,
                "inference_stats": {
                    "success": duration(totals.success),
                    "fail": duration(totals.fail),
                    "queue": duration(totals.queue),
                    "compute_input": duration(input),
                    "compute_infer": duration(infer),
                    "compute_output": duration(output),
                    "cache_hit": none,
                    "cache_miss": none,
                },
                "batch_stats": [],
                "memory_usage": [],
            })
        })
        .collect();
    json!({ "model_stats": model_stats })
}
