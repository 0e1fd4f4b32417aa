//! wrk, the third-party load generator the suite cross-checks its closed-loop rows with: a
//! figure our own generator reports should be one a user reproduces with a tool we did not
//! write. `scripts/setup.sh` installs it as `.venv/bin/wrk`.

use super::{BenchError, io_error};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkReport {
    /// Its "Requests/sec" line.
    pub requests_per_second: f64,
    /// Answers outside 2xx and 3xx, and socket errors (connect, read, write, timeout).
    pub errors: u64,
}

/// wrk on PATH, else the one `scripts/setup.sh` put in `.venv/bin`.
pub fn find() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("wrk"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let local = PathBuf::from(".venv/bin/wrk");
        local.is_file().then_some(local)
    })
}

/// Posts `body` as JSON to `http://addr{path}` from `concurrency` connections on one wrk
/// thread (as our generator runs one) for `duration`.
pub async fn closed_loop(
    wrk: &std::path::Path,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    concurrency: usize,
    duration: Duration,
) -> Result<WrkReport, BenchError> {
    let body = std::str::from_utf8(body)
        .map_err(|_| BenchError::Server("wrk posts text bodies; this one is binary".into()))?;
    let script = tempfile::Builder::new()
        .suffix(".lua")
        .tempfile()
        .map_err(io_error("create wrk's script"))?;
    // A Lua long string with a level no JSON body contains: [==[ ... ]==].
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
    );
    std::fs::write(script.path(), lua).map_err(io_error("write wrk's script"))?;
    let output = tokio::process::Command::new(wrk)
        .args(["-t1", &format!("-c{concurrency}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(script.path())
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .map_err(io_error("run wrk"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(BenchError::Server(format!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    parse(&stdout).ok_or_else(|| BenchError::Server(format!("unreadable wrk output: {stdout}")))
}

/// Reads wrk's summary.
fn parse(stdout: &str) -> Option<WrkReport> {
    let mut requests_per_second = None;
    let mut errors = 0;
    for line in stdout.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            requests_per_second = rate.trim().parse().ok();
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += count.trim().parse::<u64>().ok()?;
        } else if let Some(socket) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in socket.split(',') {
                errors += part.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            }
        }
    }
    Some(WrkReport {
        requests_per_second: requests_per_second?,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rate_and_every_kind_of_error_from_wrks_summary() {
        let clean = "Running 5s test @ http://127.0.0.1:1/v2/models/fraud/infer\n  1 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.02ms  200.00us   5.00ms   90.00%\n  110000 requests in 5.00s, 30.00MB read\nRequests/sec:  22000.12\nTransfer/sec:      6.00MB\n";
        assert_eq!(
            parse(clean),
            Some(WrkReport {
                requests_per_second: 22000.12,
                errors: 0
            })
        );
        let failing = "  Socket errors: connect 0, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 7\nRequests/sec:    100.00\n";
        assert_eq!(parse(failing).map(|r| r.errors), Some(12));
        assert_eq!(parse("no summary here"), None);
    }
}
