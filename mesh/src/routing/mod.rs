//! Routing: which replica takes a request ([`balance`]), whether a failed one goes to another
//! ([`retry`]), the one loop that does both for every caller ([`replicas`]), and the route
//! hint that tells callers where a model lives, in the native frame and in the
//! `meshserve-route` HTTP header.

pub mod balance;
pub mod replicas;
pub mod retry;

use crate::wire::{Replica, RouteHint};
use std::net::SocketAddr;

/// The HTTP response header carrying the route hint.
pub const ROUTE_HEADER: &str = "meshserve-route";

/// The route hint as a header value:
/// `fraud; epoch=00ab..; nodes=a,b; http=127.0.0.1:8001,127.0.0.1:8002; quic=127.0.0.1:7001,127.0.0.1:7002; h3=127.0.0.1:8443,-`
/// (`-` for a replica that serves no HTTP/3; the `h3` list is left out when none does).
pub fn route_header(hint: &RouteHint) -> String {
    let list =
        |f: &dyn Fn(&Replica) -> String| hint.replicas.iter().map(f).collect::<Vec<_>>().join(",");
    let mut header = format!(
        "{}; epoch={:016x}; nodes={}; http={}; quic={}",
        hint.model,
        hint.epoch,
        list(&|r| r.node.clone()),
        list(&|r| r.http.to_string()),
        list(&|r| r.quic.to_string()),
    );
    if hint.replicas.iter().any(|r| r.http3.is_some()) {
        header.push_str("; h3=");
        header.push_str(&list(&|r| {
            r.http3.map_or_else(|| "-".to_string(), |a| a.to_string())
        }));
    }
    header
}

/// Parses a `meshserve-route` header value; `None` when it is not one.
pub fn parse_route_header(value: &str) -> Option<RouteHint> {
    let mut parts = value.split(';').map(str::trim);
    let model = parts.next()?.to_string();
    let (mut epoch, mut nodes, mut http, mut quic) = (None, Vec::new(), Vec::new(), Vec::new());
    let mut http3: Option<Vec<Option<SocketAddr>>> = None;
    for part in parts {
        let (key, value) = part.split_once('=')?;
        let items = || value.split(',').filter(|s| !s.is_empty());
        match key {
            "epoch" => epoch = u64::from_str_radix(value, 16).ok(),
            "nodes" => nodes = items().map(str::to_string).collect(),
            "http" => http = items().map(str::parse).collect::<Result<_, _>>().ok()?,
            "quic" => quic = items().map(str::parse).collect::<Result<_, _>>().ok()?,
            "h3" => {
                http3 = Some(
                    items()
                        .map(|item| match item {
                            "-" => Ok(None),
                            addr => addr.parse().map(Some),
                        })
                        .collect::<Result<_, _>>()
                        .ok()?,
                )
            }
            _ => {}
        }
    }
    let http3 = http3.unwrap_or_else(|| vec![None; nodes.len()]);
    if nodes.len() != http.len() || nodes.len() != quic.len() || nodes.len() != http3.len() {
        return None;
    }
    let replicas = nodes
        .into_iter()
        .zip(http)
        .zip(quic)
        .zip(http3)
        .map(|(((node, http), quic), http3)| Replica {
            node,
            http,
            quic,
            http3,
        })
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
                    http3: Some("127.0.0.1:8443".parse().unwrap()),
                },
                Replica {
                    node: "b".into(),
                    quic: "[::1]:7002".parse().unwrap(),
                    http: "[::1]:8002".parse().unwrap(),
                    http3: None,
                },
            ],
        };
        let header = route_header(&hint);
        assert!(
            header.starts_with("fraud; epoch=0000000000000abc; nodes=a,b;"),
            "{header}"
        );
        assert!(header.ends_with("; h3=127.0.0.1:8443,-"), "{header}");
        assert_eq!(parse_route_header(&header), Some(hint.clone()));
        // Without HTTP/3 anywhere the list is left out, and its absence parses as none.
        let mut plain = hint;
        plain.replicas[0].http3 = None;
        let header = route_header(&plain);
        assert!(!header.contains("h3="), "{header}");
        assert_eq!(parse_route_header(&header), Some(plain));
        assert_eq!(parse_route_header("fraud; epoch=zz"), None);
        assert_eq!(
            parse_route_header("fraud; epoch=1; nodes=a; http=; quic="),
            None
        );
        assert_eq!(
            parse_route_header("fraud; epoch=1; nodes=a; http=1.2.3.4:1; quic=1.2.3.4:2; h3=-,-"),
            None,
            "one h3 entry per replica"
        );
    }
}
