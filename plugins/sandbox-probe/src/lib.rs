//! A test fixture, not a plugin to deploy: each behaviour named in the config string tries to
//! break one promise of the sandbox, so the host's tests can check that it holds.
//!
//! Config: one of `ok`, `loop`, `grow-memory`, `read-file:PATH`, `write-file:PATH`,
//! `connect:ADDR`, `env:NAME`, `panic`, `bad-shape`, `bad-datatype`, `slow:MS`, `reject`.
//! A capability that works (because the config granted it) answers the `features` input of the
//! fraud model ([1, 32] FP32, all 0.5), so the request completes with 200; one that is denied
//! answers 400 "denied: ..." with the error WASI gave.

use meshserve_guest::{Error, Plugin, Request, Tensor, host};

fn fraud_input() -> Vec<Tensor> {
    vec![Tensor::fp32("features", vec![1, 32], vec![0.5; 32])]
}

/// The plugin.
pub struct SandboxProbe;

impl Plugin for SandboxProbe {
    fn preprocess(_request: Request) -> Result<Vec<Tensor>, Error> {
        let config = host::config();
        let (behaviour, argument) = config.split_once(':').unwrap_or((config.as_str(), ""));
        match behaviour {
            "ok" => Ok(fraud_input()),
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if x == 0 {
                        return Ok(fraud_input());
                    }
                }
            }
            "grow-memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    if hoard.len() == usize::MAX {
                        return Ok(fraud_input());
                    }
                }
            }
            "read-file" => match std::fs::read(argument) {
                Ok(_) => Ok(fraud_input()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "write-file" => match std::fs::write(argument, b"escaped") {
                Ok(()) => Ok(fraud_input()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "connect" => match std::net::TcpStream::connect(argument) {
                Ok(_) => Ok(fraud_input()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "env" => match std::env::var(argument) {
                Ok(_) => Ok(fraud_input()),
                Err(e) => Err(Error::bad_request(format!("denied: {e}"))),
            },
            "panic" => panic!("sandbox-probe was told to panic"),
            "bad-shape" => Ok(vec![Tensor::fp32("features", vec![1, 32], vec![0.5; 31])]),
            "bad-datatype" => Ok(vec![Tensor::fp64("features", vec![1, 32], vec![0.5; 32])]),
            "slow" => {
                let ms: u64 = argument.parse().unwrap_or(1);
                let until = host::monotonic_now() + ms * 1_000_000;
                while host::monotonic_now() < until {}
                Ok(fraud_input())
            }
            "reject" => Err(Error::unprocessable("sandbox-probe rejects this request")),
            other => Err(Error::internal(format!("unknown behaviour '{other}'"))),
        }
    }
}

meshserve_guest::export_plugin!(SandboxProbe);
