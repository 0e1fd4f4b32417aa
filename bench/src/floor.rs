//! The floor: a bare hyper server (HTTP/1.1 and HTTP/2, as the node's TCP front door) that
//! reads each request's body and answers a fixed OIP response, with no routing, parsing,
//! model or metrics. Under the same load generator it shows what the protocol itself costs on
//! this machine, so a node's numbers read as a ratio to it (`meshserve-bench floor-server`
//! runs it as a process of its own, as the node is).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What the fraud model answers for one row, as the node encodes it.
pub const FIXED_RESPONSE: &str = r#"{"model_name":"fraud","model_version":"1","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.4932176,0.5067824]}]}"#;

/// How the floor server behaves: as fast as it can by default; with `service_time` and
/// `capacity` it becomes a server of known capacity (`capacity / service_time` requests per
/// second), which the load generator's own tests drive past saturation.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloorConfig {
    /// Time each answer takes once admitted.
    pub service_time: Duration,
    /// Requests served at once (others wait); 0 means no limit.
    pub capacity: usize,
}

async fn answer(
    request: Request<Incoming>,
    config: FloorConfig,
    slots: Option<Arc<Semaphore>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as a real server must; a broken one is still answered.
    let _ = request.into_body().collect().await;
    let _permit = match &slots {
        Some(slots) => slots.clone().acquire_owned().await.ok(),
        None => None,
    };
    if !config.service_time.is_zero() {
        tokio::time::sleep(config.service_time).await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(FIXED_RESPONSE.as_bytes())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: FloorConfig) {
    let slots = (config.capacity > 0).then(|| Arc::new(Semaphore::new(config.capacity)));
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| answer(request, config, slots.clone()));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The kernel's own floor under any HTTP server: one thread writes `request_bytes` over a
/// loopback TCP connection and blocks until `response_bytes` come back from a thread that
/// blocks reading them, one exchange at a time. No HTTP, no async runtime: what a
/// request/response round trip costs on this machine before any server code runs (on a
/// virtual machine mostly the two sleeping threads' wake-ups).
pub fn loopback_ping_pong(
    request_bytes: usize,
    response_bytes: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<super::Report> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let (mut request, response) = (vec![0u8; request_bytes], vec![b'r'; response_bytes]);
        // Ends when the client closes: read_exact then fails.
        while stream.read_exact(&mut request).is_ok() {
            stream.write_all(&response)?;
        }
        Ok(())
    });
    let mut client = std::net::TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    let (request, mut response) = (vec![b'q'; request_bytes], vec![0u8; response_bytes]);
    let report = super::Report::time_each(1, warmup, duration, || {
        client.write_all(&request)?;
        client.read_exact(&mut response)
    })?;
    drop(client);
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_ping_pong_counts_every_exchange_it_times() {
        let report =
            loopback_ping_pong(300, 200, Duration::ZERO, Duration::from_millis(200)).unwrap();
        assert!(report.ok > 10, "only {} exchanges in 200 ms", report.ok);
        assert_eq!(report.latency_us.len(), report.ok);
        assert!(report.elapsed >= Duration::from_millis(200));
    }
}
