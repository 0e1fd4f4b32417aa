//! A test fixture, not a plugin to deploy: each behaviour named in the config string tries to
//! break one promise of the sandbox, so the host's tests can check that it holds. It exports
//! both stages.
//!
//! Config: `BEHAVIOUR` or `BEHAVIOUR:ARGUMENT`. Pre-stage behaviours:
//! `ok`, `loop`, `grow-memory`, `read-file:PATH`, `write-file:PATH`, `connect:ADDR`, `env:NAME`,
//! `panic`, `exit`, `bad-shape`, `bad-datatype`, `slow:MS` (busy), `sleep:MS` (blocked in WASI),
//! `reject`, `log-flood:LINES`, `log-forge`, `lookup-key:BYTES`, `lookup-table:BYTES`,
//! `random:BYTES`, `big-output:BYTES`, `many-tensors:N`, `rank:N`, `long-name:BYTES`,
//! `count` (answers directly with how many calls this instance has served), `headers` (answers
//! directly with the headers it can see), `header:NAME` (answers directly with that header's
//! value, or null), `reply:STATUS`, `many-headers:N` (a reply with N
//! headers), `pollables:N` (holds N WASI pollables), `init-fail`, `init-fail-later:BYTES` (every
//! instance after the first fails `init` with a message that long; needs `/state` granted
//! writable).
//! Post-stage behaviours: `ok` (outputs unchanged), `big-body:BYTES`, `bad-header`,
//! `reply:STATUS`, `sleep:MS`, `panic`, `count`.
//! A capability that works (because the config granted it) answers the `features` input of the
//! fraud model ([1, 32] FP32, all 0.5), so the request completes with 200; one that is denied
//! answers 400 "denied: ..." with the error WASI gave.

use meshserve_guest::{
    Answer, Context, Error, Plugin, Postprocess, Pre, Preprocess, Reply, Request, Tensor, host,
};
use std::time::{Duration, Instant};

fn fraud_input() -> Vec<Tensor> {
    vec![Tensor::fp32("features", vec![1, 32], vec![0.5; 32])]
}

/// Where `init-fail-later` marks that an instance has started.
const STARTED_MARKER: &str = "/state/started";

fn number(argument: &str) -> usize {
    argument.parse().unwrap_or(1)
}

/// The plugin: its behaviour, and the calls this instance has served.
pub struct SandboxProbe {
    behaviour: String,
    argument: String,
    calls: u64,
}

impl Plugin for SandboxProbe {
    fn init(config: &str) -> Result<Self, Error> {
        let (behaviour, argument) = config.split_once(':').unwrap_or((config, ""));
        match behaviour {
            "init-fail" => return Err(Error::internal("sandbox-probe was told to fail init")),
            "init-fail-later" => {
                // The first instance (the node's warm-up at load) starts; every later one fails.
                if std::fs::metadata(STARTED_MARKER).is_ok() {
                    return Err(Error::internal("m".repeat(number(argument))));
                }
                std::fs::write(STARTED_MARKER, b"")
                    .map_err(|e| Error::internal(format!("cannot mark the start: {e}")))?;
            }
            "init-loop" => loop {
                std::hint::spin_loop();
            },
            "init-spin" => {
                // A slow but finite start (an interpreter, a table to build); then serves.
                let busy = Duration::from_millis(number(argument) as u64);
                let start = Instant::now();
                while start.elapsed() < busy {
                    std::hint::spin_loop();
                }
                return Ok(SandboxProbe {
                    behaviour: "ok".into(),
                    argument: String::new(),
                    calls: 0,
                });
            }
            _ => {}
        }
        Ok(SandboxProbe {
            behaviour: behaviour.to_string(),
            argument: argument.to_string(),
            calls: 0,
        })
    }
}

impl SandboxProbe {
    fn count(&mut self) -> Result<Reply, Error> {
        self.calls += 1;
        Reply::json(&serde_json::json!({ "calls": self.calls }))
    }
}

impl Preprocess for SandboxProbe {
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
        let argument = self.argument.as_str();
        match self.behaviour.as_str() {
            "ok" => Ok(fraud_input().into()),
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if x == 0 {
                        return Ok(fraud_input().into());
                    }
                }
            }
            "grow-memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    if hoard.len() == usize::MAX {
                        return Ok(fraud_input().into());
                    }
                }
            }
            "read-file" => match std::fs::read(argument) {
                Ok(_) => Ok(fraud_input().into()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "write-file" => match std::fs::write(argument, b"escaped") {
                Ok(()) => Ok(fraud_input().into()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "connect" => match std::net::TcpStream::connect(argument) {
                Ok(_) => Ok(fraud_input().into()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "env" => match std::env::var(argument) {
                Ok(_) => Ok(fraud_input().into()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "panic" => panic!("sandbox-probe was told to panic"),
            "exit" => std::process::exit(3),
            "bad-shape" => Ok(vec![Tensor::fp32("features", vec![1, 32], vec![0.5; 31])].into()),
            "bad-datatype" => Ok(vec![Tensor::fp64("features", vec![1, 32], vec![0.5; 32])].into()),
            "slow" => {
                let until = Instant::now() + Duration::from_millis(number(argument) as u64);
                while Instant::now() < until {}
                Ok(fraud_input().into())
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(number(argument) as u64));
                Ok(fraud_input().into())
            }
            "reject" => Err(Error::unprocessable("sandbox-probe rejects this request")),
            "log-flood" => {
                for i in 0..number(argument) {
                    host::info(&format!("sandbox-probe flood line {i}"));
                }
                Ok(fraud_input().into())
            }
            "log-forge" => {
                let mut message =
                    "innocent\n2026-01-01T00:00:00Z ERROR forged: node compromised\u{1b}[31m"
                        .to_string();
                message.push_str(&"x".repeat(1 << 20));
                host::warn(&message);
                Ok(fraud_input().into())
            }
            "lookup-key" => {
                let key = "k".repeat(number(argument));
                let _ = host::lookup("cards", &key);
                Ok(fraud_input().into())
            }
            "lookup-table" => {
                let table = "t".repeat(number(argument));
                let _ = host::lookup(&table, "c1");
                Ok(fraud_input().into())
            }
            "random" => {
                let bytes = wasi::random::random::get_random_bytes(number(argument) as u64);
                Ok(vec![Tensor::fp32(
                    "features",
                    vec![1, 32],
                    vec![bytes.len() as f32; 32],
                )]
                .into())
            }
            "big-output" => {
                let floats = number(argument) / 4;
                Ok(vec![Tensor::fp32(
                    "features",
                    vec![1, floats as i64],
                    vec![0.5; floats],
                )]
                .into())
            }
            "many-tensors" => Ok((0..number(argument))
                .map(|i| Tensor::fp32(format!("t{i}"), vec![1], vec![0.5]))
                .collect::<Vec<_>>()
                .into()),
            "rank" => Ok(vec![Tensor::fp32(
                "features",
                vec![1; number(argument)],
                vec![0.5],
            )]
            .into()),
            "long-name" => Ok(vec![Tensor::fp32(
                "n".repeat(number(argument)),
                vec![1],
                vec![0.5],
            )]
            .into()),
            "count" => Ok(Pre::Reply(self.count()?)),
            "many-headers" => {
                let mut reply = Reply::json(&serde_json::json!({}))?;
                reply.headers = (0..number(argument))
                    .map(|i| (format!("x-h{i}"), "v".to_string()))
                    .collect();
                Ok(Pre::Reply(reply))
            }
            "pollables" => {
                let held: Vec<_> = (0..number(argument))
                    .map(|_| wasi::clocks::monotonic_clock::subscribe_duration(1 << 40))
                    .collect();
                drop(held);
                Ok(fraud_input().into())
            }
            "headers" => Ok(Pre::Reply(Reply::json(&request.headers())?)),
            "header" => Ok(Pre::Reply(Reply::json(&request.header(argument))?)),
            "reply" => Ok(Pre::Reply(
                Reply::json(&serde_json::json!({ "answered": "by the pre stage" }))?
                    .with_status(number(argument) as u16)
                    .with_header("x-probe", "pre"),
            )),
            other => Err(Error::internal(format!("unknown behaviour '{other}'"))),
        }
    }
}

impl Postprocess for SandboxProbe {
    fn postprocess(&mut self, _context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        let argument = self.argument.as_str();
        match self.behaviour.as_str() {
            "ok" => Ok(Answer::Tensors(outputs)),
            "big-body" => Ok(Answer::Reply(Reply {
                status: 200,
                headers: Vec::new(),
                content_type: "application/octet-stream".into(),
                body: vec![7u8; number(argument)],
            })),
            "bad-header" => Ok(Answer::Reply(
                Reply::json(&"framing")?.with_header("content-length", "1"),
            )),
            "reply" => Ok(Answer::Reply(
                Reply::json(&serde_json::json!({ "outputs": outputs.len() }))?
                    .with_status(number(argument) as u16)
                    .with_header("x-probe", "post"),
            )),
            "sleep" => {
                std::thread::sleep(Duration::from_millis(number(argument) as u64));
                Ok(Answer::Tensors(outputs))
            }
            "panic" => panic!("sandbox-probe post was told to panic"),
            "count" => Ok(Answer::Reply(self.count()?)),
            other => Err(Error::internal(format!("unknown behaviour '{other}'"))),
        }
    }
}

meshserve_guest::export_plugin!(SandboxProbe: pre, post);
