//! Routing: which replica takes a request ([`balance`]) and the route hint that tells callers
//! where a model lives, in the native frame and in the `meshserve-route` HTTP header.

pub mod balance;

use crate::wire::{Replica, RouteHint};

/// The HTTP response header carrying the route hint.
pub const ROUTE_HEADER: &str = "meshserve-route";

/// The route hint as a header value:
/// `fraud; epoch=00ab..; nodes=a,b; http=127.0.0.1:8001,127.0.0.1:8002; quic=127.0.0.1:7001,127.0.0.1:7002`.
pub fn route_header(hint: &RouteHint) -> String {
    let list =
        |f: &dyn Fn(&Replica) -> String| hint.replicas.iter().map(f).collect::<Vec<_>>().join(",");
    format!(
        "{}; epoch={:016x}; nodes={}; http={}; quic={}",
        hint.model,
        hint.epoch,
        list(&|r| r.node.clone()),
        list(&|r| r.http.to_string()),
        list(&|r| r.quic.to_string()),
    )
}

/// Parses a `meshserve-route` header value; `None` when it is not one.
pub fn parse_route_header(value: &str) -> Option<RouteHint> {
    let mut parts = value.split(';').map(str::trim);
    let model = parts.next()?.to_string();
    let (mut epoch, mut nodes, mut http, mut quic) = (None, Vec::new(), Vec::new(), Vec::new());
    for part in parts {
        let (key, value) = part.split_once('=')?;
        let items = || value.split(',').filter(|s| !s.is_empty());
        match key {
            "epoch" => epoch = u64::from_str_radix(value, 16).ok(),
            "nodes" => nodes = items().map(str::to_string).collect(),
            "http" => http = items().map(str::parse).collect::<Result<_, _>>().ok()?,
            "quic" => quic = items().map(str::parse).collect::<Result<_, _>>().ok()?,
            _ => {}
        }
    }
    if nodes.len() != http.len() || nodes.len() != quic.len() {
        return None;
    }
    let replicas = nodes
        .into_iter()
        .zip(http)
        .zip(quic)
        .map(|((node, http), quic)| Replica { node, http, quic })
        .collect();
    Some(RouteHint {
        model,
        epoch: epoch?,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips() {
        let hint = RouteHint {
            model: "fraud".into(),
            epoch: 0xabc,
            replicas: vec![
                Replica {
                    node: "a".into(),
                    quic: "127.0.0.1:7001".parse().unwrap(),
                    http: "127.0.0.1:8001".parse().unwrap(),
                },
                Replica {
                    node: "b".into(),
                    quic: "[::1]:7002".parse().unwrap(),
                    http: "[::1]:8002".parse().unwrap(),
                },
            ],
        };
        let header = route_header(&hint);
        assert!(
            header.starts_with("fraud; epoch=0000000000000abc; nodes=a,b;"),
            "{header}"
        );
        assert_eq!(parse_route_header(&header), Some(hint));
        assert_eq!(parse_route_header("fraud; epoch=zz"), None);
        assert_eq!(
            parse_route_header("fraud; epoch=1; nodes=a; http=; quic="),
            None
        );
    }
}
