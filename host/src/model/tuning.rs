//! Sessions and threads for a model whose config leaves them unset, chosen at load from how
//! the model runs on this machine.
//!
//! A model with no config.toml should be served as well as a tuned one. What decides its
//! sessions and threads is whether ONNX Runtime can spread one run over the cores, and how
//! long a run takes: a large operator can be spread, and then one session using every core
//! gives the shortest runs (and batches fill it); a graph that cannot gains nothing from an
//! intra-op pool but wake-ups competing with the front door's threads, so it gets
//! single-threaded sessions on half the cores, leaving the rest to the front door. The
//! loader times the model's largest run (a full batch, or one row when it does not batch) on
//! one thread and on every core and decides ([`choose`]); config keys set by the operator
//! are never overridden. The probe runs on zero-filled inputs and its sessions are kept, so
//! it costs a few runs, not extra loads.

use crate::model::config::{DEFAULT_MAX_BATCH_SIZE, ExecutionProvider, ModelConfig};
use crate::model::session::{LoadError, OnnxSession};
use crate::model::signature::Signature;
use crate::runtime::Runtime;
use crate::tensor::Tensor;
use bytes::Bytes;
use std::path::Path;
use std::time::{Duration, Instant};

/// The parallel efficiency (speed-up over the added threads) at which one session on every
/// core beats single-threaded sessions: below it, the extra threads mostly wait.
const MIN_PARALLEL_EFFICIENCY: f64 = 0.6;

/// The model bytes that copies of one model's sessions may hold together: every session
/// keeps its own weights, so a large model gets fewer sessions than cores.
const SESSION_COPIES_BYTES: u64 = 2 << 30;

/// Timed runs of one probe: at most this many, and no more once [`PROBE_BUDGET`] is spent.
const PROBE_RUNS: usize = 15;
const PROBE_BUDGET: Duration = Duration::from_millis(100);

/// The machine a model is tuned for.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: usize,
}

impl Machine {
    /// This process's machine.
    pub fn here() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What the probe measured: the median time of the model's largest run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Rows in the timed run (the batch size, or 1).
    pub rows: usize,
    /// On one intra-op thread.
    pub one_thread: Duration,
    /// On one intra-op thread per core (`None` on a single core).
    pub every_core: Option<Duration>,
    /// Size of the model file.
    pub model_bytes: u64,
}

/// The sessions and threads a model is served with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// ONNX Runtime sessions.
    pub instances: usize,
    /// Intra-op threads per session.
    pub intra_op_threads: usize,
    /// One line for the log and the model's config endpoint.
    pub reason: String,
}

/// What an operator's config decides alone, without a probe; `None` when both keys are
/// unset and the probe must decide.
pub fn from_config(config: &ModelConfig, machine: Machine) -> Option<Choice> {
    let cores = machine.cores.max(1);
    let share = |instances: usize| (cores / instances.max(1)).max(1);
    let on_device = config
        .execution_providers
        .iter()
        .any(|p| *p != ExecutionProvider::Cpu);
    match (config.instances, config.intra_op_threads) {
        (None, None) if on_device => Some(Choice {
            instances: 1,
            intra_op_threads: cores,
            reason: "a GPU provider is listed: one session, as each holds its own copy of the model on the device".into(),
        }),
        (None, None) => None,
        (Some(instances), Some(threads)) => Some(Choice {
            instances,
            intra_op_threads: if threads == 0 {
                share(instances)
            } else {
                threads
            },
            reason: "instances and intra_op_threads from config.toml".into(),
        }),
        (Some(instances), None) => Some(Choice {
            instances,
            intra_op_threads: share(instances),
            reason: format!(
                "instances from config.toml, the {cores} cores shared among them for intra-op threads"
            ),
        }),
        (None, Some(threads)) => Some(Choice {
            instances: 1,
            intra_op_threads: if threads == 0 { cores } else { threads },
            reason: "intra_op_threads from config.toml, one session".into(),
        }),
    }
}

/// Sessions and threads for a model that leaves both unset, from what the probe measured.
///
/// - A run that the cores speed up gets one session using them all.
/// - Otherwise single-threaded sessions on half the cores: under load a model's requests run
///   on its workers, in batches (a lone caller runs inline whatever the count), and the
///   front door that parses and answers them needs cores too. On 2 cores at concurrency 64,
///   heavy served 22-25k req/s so, against 18.7k with a session per core and 19-21k with one
///   session on both; fraud (a 10 µs run) 69-75k against 55-60k with a session per core.
pub fn choose(probe: &Probe, machine: Machine) -> Choice {
    let cores = machine.cores.max(1);
    let run = format!(
        "a {}-row run takes {} on 1 thread",
        probe.rows,
        shown(probe.one_thread)
    );
    let Some(every_core) = probe.every_core.filter(|_| cores > 1) else {
        return Choice {
            instances: 1,
            intra_op_threads: 1,
            reason: format!("one core: one single-threaded session ({run})"),
        };
    };
    let speedup = probe.one_thread.as_secs_f64() / every_core.as_secs_f64().max(1e-9);
    let efficiency = (speedup - 1.0) / (cores - 1) as f64;
    let measured = format!("{run} and {} on {cores} ({speedup:.2}x)", shown(every_core));
    if efficiency >= MIN_PARALLEL_EFFICIENCY {
        return Choice {
            instances: 1,
            intra_op_threads: cores,
            reason: format!("{measured}: one session uses every core"),
        };
    }
    let wanted = (cores / 2).max(1);
    let why = "single-threaded sessions on half the cores, the rest left to the front door that feeds them";
    let by_memory = usize::try_from((SESSION_COPIES_BYTES / probe.model_bytes.max(1)).max(1))
        .unwrap_or(usize::MAX);
    let instances = wanted.min(by_memory);
    let memory_note = if instances < wanted {
        format!(
            " ({instances}, not {wanted}: each session holds its own {} MiB of weights)",
            probe.model_bytes >> 20
        )
    } else {
        String::new()
    };
    Choice {
        instances,
        intra_op_threads: 1,
        reason: format!("{measured}: {why}{memory_note}"),
    }
}

fn shown(time: Duration) -> String {
    format!("{} µs", time.as_micros())
}

/// Loads the sessions `config` asks for, probing first when it leaves sessions and threads
/// unset. Returns them with the choice made; a model the probe cannot run (inputs it will not
/// take zeros for) gets one session per core's share, as before tuning existed.
pub fn load_sessions(
    runtime: &Runtime,
    path: &Path,
    config: &ModelConfig,
    machine: Machine,
) -> Result<(Vec<OnnxSession>, Choice), LoadError> {
    let with_threads = |threads: usize| ModelConfig {
        instances: Some(1),
        intra_op_threads: Some(threads),
        ..config.clone()
    };
    // Every session runs once before it serves: ONNX Runtime's first run of a session costs
    // many times a usual one, and would otherwise fall on a client. A model that refuses
    // zeros warms on its first request instead.
    let load_more =
        |sessions: &mut Vec<OnnxSession>, choice: &Choice, inputs: Option<&[Tensor]>| {
            while sessions.len() < choice.instances {
                let mut session =
                    OnnxSession::load(runtime, path, &with_threads(choice.intra_op_threads))?;
                let inputs =
                    inputs.map_or_else(|| zero_inputs(session.signature(), 1), <[Tensor]>::to_vec);
                let _ = session.run(&inputs);
                sessions.push(session);
            }
            Ok::<(), LoadError>(())
        };
    if let Some(choice) = from_config(config, machine) {
        let mut sessions = Vec::with_capacity(choice.instances);
        load_more(&mut sessions, &choice, None)?;
        return Ok((sessions, choice));
    }
    let mut single = OnnxSession::load(runtime, path, &with_threads(1))?;
    let rows = if single.signature().supports_batching() {
        config
            .max_batch_size
            .unwrap_or(DEFAULT_MAX_BATCH_SIZE)
            .max(1)
    } else {
        1
    };
    let inputs = zero_inputs(single.signature(), rows);
    let Some(one_thread) = median_run(&mut single, &inputs) else {
        let choice = Choice {
            instances: 1,
            intra_op_threads: machine.cores.max(1),
            reason:
                "the probe could not run the model on zero-filled inputs: one session on every core"
                    .into(),
        };
        return Ok((
            vec![OnnxSession::load(
                runtime,
                path,
                &with_threads(choice.intra_op_threads),
            )?],
            choice,
        ));
    };
    let mut parallel = None;
    let every_core = if machine.cores > 1 {
        let mut session = OnnxSession::load(runtime, path, &with_threads(machine.cores))?;
        let time = median_run(&mut session, &inputs);
        parallel = Some(session);
        time
    } else {
        None
    };
    let probe = Probe {
        rows,
        one_thread,
        every_core,
        model_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
    };
    let choice = choose(&probe, machine);
    let mut sessions = vec![match parallel {
        Some(session) if choice.intra_op_threads > 1 => session,
        _ => single,
    }];
    load_more(&mut sessions, &choice, Some(&inputs))?;
    Ok((sessions, choice))
}

/// The median of up to [`PROBE_RUNS`] timed runs after one warm-up, within [`PROBE_BUDGET`];
/// `None` if the model refuses the inputs.
fn median_run(session: &mut OnnxSession, inputs: &[Tensor]) -> Option<Duration> {
    session.run(inputs).ok()?;
    let started = Instant::now();
    let mut times = Vec::with_capacity(PROBE_RUNS);
    while times.len() < PROBE_RUNS && (times.is_empty() || started.elapsed() < PROBE_BUDGET) {
        let run = Instant::now();
        session.run(inputs).ok()?;
        times.push(run.elapsed());
    }
    times.sort_unstable();
    Some(times[times.len() / 2])
}

/// Zero-filled inputs for `signature`: `rows` along a dynamic first dimension, 1 along any
/// other dynamic one, empty strings for BYTES.
fn zero_inputs(signature: &Signature, rows: usize) -> Vec<Tensor> {
    signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<i64> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, &d)| match (axis, d) {
                    (_, d) if d >= 0 => d,
                    (0, _) => i64::try_from(rows).unwrap_or(1),
                    _ => 1,
                })
                .collect();
            let count = Tensor::element_count_of(&shape).unwrap_or(0);
            // A BYTES element of length zero is its 4-byte length prefix alone.
            let element_bytes = spec.datatype.element_size().unwrap_or(4);
            Tensor {
                name: spec.name.clone(),
                datatype: spec.datatype,
                shape,
                data: Bytes::from(vec![0u8; count * element_bytes]),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn probe(one_us: u64, every_us: Option<u64>) -> Probe {
        Probe {
            rows: 64,
            one_thread: Duration::from_micros(one_us),
            every_core: every_us.map(Duration::from_micros),
            model_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_graph_too_small_to_split_gets_single_threaded_sessions_on_half_the_cores() {
        let choice = choose(&probe(20, Some(19)), Machine { cores: 4 });
        assert_eq!((choice.instances, choice.intra_op_threads), (2, 1));
        assert!(choice.reason.contains("1.05x"), "{}", choice.reason);
    }

    #[test]
    fn a_run_that_scales_over_the_cores_gets_one_session_using_them_all() {
        let choice = choose(&probe(8_000, Some(4_600)), Machine { cores: 2 });
        assert_eq!((choice.instances, choice.intra_op_threads), (1, 2));
    }

    #[test]
    fn a_long_run_that_does_not_scale_leaves_half_the_cores_to_the_front_door() {
        // 1.2x on 4 cores is a poor use of three extra threads.
        let choice = choose(&probe(8_000, Some(6_600)), Machine { cores: 4 });
        assert_eq!((choice.instances, choice.intra_op_threads), (2, 1));
        let choice = choose(&probe(1_600, Some(1_550)), Machine { cores: 2 });
        assert_eq!((choice.instances, choice.intra_op_threads), (1, 1));
        assert!(choice.reason.contains("front door"), "{}", choice.reason);
    }

    #[test]
    fn a_large_model_gets_no_more_sessions_than_its_weights_allow() {
        let mut big = probe(30, Some(29));
        big.model_bytes = 900 << 20;
        let choice = choose(&big, Machine { cores: 16 });
        assert_eq!((choice.instances, choice.intra_op_threads), (2, 1));
        assert!(choice.reason.contains("900 MiB"), "{}", choice.reason);
        big.model_bytes = 300 << 20;
        let choice = choose(&big, Machine { cores: 16 });
        assert_eq!((choice.instances, choice.intra_op_threads), (6, 1));
    }

    #[test]
    fn one_core_gets_one_single_threaded_session() {
        let choice = choose(&probe(100, None), Machine { cores: 1 });
        assert_eq!((choice.instances, choice.intra_op_threads), (1, 1));
    }

    #[test]
    fn keys_the_operator_set_are_kept_and_the_rest_follows_from_them() {
        let machine = Machine { cores: 8 };
        let config = |instances, threads| ModelConfig {
            instances,
            intra_op_threads: threads,
            ..ModelConfig::default()
        };
        assert_eq!(from_config(&config(None, None), machine), None);
        let gpu = ModelConfig {
            execution_providers: vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu],
            ..ModelConfig::default()
        };
        let gpu = from_config(&gpu, machine).unwrap();
        assert_eq!((gpu.instances, gpu.reason.contains("GPU")), (1, true));
        let both = from_config(&config(Some(3), Some(5)), machine).unwrap();
        assert_eq!((both.instances, both.intra_op_threads), (3, 5));
        let instances = from_config(&config(Some(2), None), machine).unwrap();
        assert_eq!((instances.instances, instances.intra_op_threads), (2, 4));
        let threads = from_config(&config(None, Some(2)), machine).unwrap();
        assert_eq!((threads.instances, threads.intra_op_threads), (1, 2));
        let shared = from_config(&config(Some(3), Some(0)), machine).unwrap();
        assert_eq!((shared.instances, shared.intra_op_threads), (3, 2));
    }

    #[test]
    fn zero_inputs_fill_dynamic_dimensions_with_rows_then_ones() {
        let signature = Signature {
            inputs: vec![
                crate::model::signature::TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, 3, -1],
                },
                crate::model::signature::TensorSpec {
                    name: "s".into(),
                    datatype: DataType::Bytes,
                    shape: vec![-1],
                },
            ],
            outputs: vec![],
        };
        let inputs = zero_inputs(&signature, 8);
        assert_eq!(inputs[0].shape, vec![8, 3, 1]);
        assert_eq!(inputs[0].data.len(), 8 * 3 * 4);
        assert!(inputs[0].validate().is_ok());
        assert_eq!(inputs[1].shape, vec![8]);
        assert!(inputs[1].validate().is_ok(), "eight empty strings");
    }
}
