//! Seeds by name: each `host:port` seed is resolved to every address its name holds, so one DNS
//! name (a Kubernetes headless Service) is the whole seed list, and resolved again every
//! refresh period, so members that come and go under that name are found. An optional
//! hosts file (the `/etc/hosts` format) is consulted before the system resolver, for names DNS
//! does not know and for tests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Largest hosts file read: it is a file on disk, not trusted to be small.
pub const MAX_HOSTS_FILE_BYTES: u64 = 1 << 20;

/// Why a seed does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// Not `host:port`.
    #[error("'{0}' is not host:port")]
    Malformed(String),
    /// The name holds no address (yet).
    #[error("'{seed}' does not resolve: {reason}")]
    Unresolved {
        /// The seed as configured.
        seed: String,
        /// What the resolver said.
        reason: String,
    },
}

/// Names and their addresses from a hosts file: `ADDRESS NAME [ALIAS...]` per line, `#`
/// comments; a name on several lines holds every address given for it.
pub fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in fields {
            let addresses = names.entry(name.to_ascii_lowercase()).or_default();
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    names
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals).
pub fn split_host_port(seed: &str) -> Result<(&str, u16), SeedError> {
    let malformed = || SeedError::Malformed(seed.to_string());
    let (host, port) = seed.rsplit_once(':').ok_or_else(malformed)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(malformed());
    }
    Ok((host, port.parse().map_err(|_| malformed())?))
}

/// Resolves seeds by name.
#[derive(Debug, Clone)]
pub struct Resolver {
    hosts_file: Option<PathBuf>,
}

impl Resolver {
    /// A resolver that reads `hosts_file` (if any) before asking the system.
    pub fn new(hosts_file: Option<PathBuf>) -> Resolver {
        Resolver { hosts_file }
    }

    fn hosts(&self) -> HashMap<String, Vec<IpAddr>> {
        match &self.hosts_file {
            Some(path) => match read_bounded(path) {
                Ok(text) => parse_hosts(&text),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "hosts file unreadable; using the system resolver only");
                    HashMap::new()
                }
            },
            None => HashMap::new(),
        }
    }

    /// Every address of one `host:port`.
    pub async fn resolve(&self, seed: &str) -> Result<Vec<SocketAddr>, SeedError> {
        let (host, port) = split_host_port(seed)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.hosts().get(&host.to_ascii_lowercase()) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let unresolved = |reason: String| SeedError::Unresolved {
            seed: seed.to_string(),
            reason,
        };
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| unresolved(e.to_string()))?
            .collect();
        if found.is_empty() {
            return Err(unresolved("no address".into()));
        }
        Ok(found)
    }

    /// Every address of every seed, sorted and without repeats, and the seeds that did not
    /// resolve.
    pub async fn resolve_all(&self, seeds: &[String]) -> (Vec<SocketAddr>, Vec<SeedError>) {
        let mut addresses = Vec::new();
        let mut failed = Vec::new();
        for seed in seeds {
            match self.resolve(seed).await {
                Ok(found) => addresses.extend(found),
                Err(e) => failed.push(e),
            }
        }
        addresses.sort();
        addresses.dedup();
        (addresses, failed)
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_HOSTS_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Resolves `seeds` now and then every `refresh`, publishing the addresses whenever they
/// change. A malformed seed is an error at once; a name that does not resolve yet (a Service
/// with no pods) is logged and tried again at the next refresh.
pub async fn watch(
    seeds: Vec<String>,
    resolver: Resolver,
    refresh: Duration,
) -> Result<watch::Receiver<Vec<SocketAddr>>, SeedError> {
    for seed in &seeds {
        split_host_port(seed)?;
    }
    let (first, failed) = resolver.resolve_all(&seeds).await;
    for e in &failed {
        tracing::warn!(error = %e, "seed not resolved; trying again every {refresh:?}");
    }
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(refresh);
        ticks.tick().await;
        while !tx.is_closed() {
            ticks.tick().await;
            let (addresses, _) = resolver.resolve_all(&seeds).await;
            // A lookup that fails for a moment does not forget the seeds it had.
            let changed = tx.send_if_modified(|current| {
                let changed = !addresses.is_empty() && *current != addresses;
                if changed {
                    current.clone_from(&addresses);
                }
                changed
            });
            if changed {
                tracing::info!(seeds = ?addresses, "seed addresses changed");
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_on_several_lines_holds_every_address() {
        let hosts = parse_hosts(
            "# comment\n127.0.0.1 localhost seeds.test\n127.0.0.2\tseeds.test # second\n\
             not-an-ip seeds.test\n127.0.0.3 Seeds.Test\n127.0.0.2 seeds.test\n",
        );
        let ips: Vec<String> = hosts["seeds.test"]
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
        assert_eq!(hosts["localhost"].len(), 1);
    }

    #[test]
    fn seeds_are_host_and_port() {
        assert_eq!(split_host_port("a.svc:7000"), Ok(("a.svc", 7000)));
        assert_eq!(split_host_port("[::1]:7000"), Ok(("::1", 7000)));
        for bad in ["a.svc", ":7000", "a.svc:port", "a.svc:70000"] {
            assert!(
                matches!(split_host_port(bad), Err(SeedError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_seed_name_resolves_through_the_hosts_file_to_every_address() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.2 seeds.test\n127.0.0.1 seeds.test\n").unwrap();
        let resolver = Resolver::new(Some(file.clone()));
        let seeds = vec!["seeds.test:7000".to_string(), "127.0.0.1:7000".to_string()];
        let (found, failed) = resolver.resolve_all(&seeds).await;
        let found: Vec<String> = found.iter().map(SocketAddr::to_string).collect();
        assert_eq!(
            found,
            ["127.0.0.1:7000", "127.0.0.2:7000"],
            "sorted, no repeats"
        );
        assert!(failed.is_empty());
        let (_, failed) = resolver
            .resolve_all(&["nowhere.invalid:7000".to_string()])
            .await;
        assert!(
            matches!(failed[..], [SeedError::Unresolved { .. }]),
            "{failed:?}"
        );
    }

    #[tokio::test]
    async fn the_seed_list_follows_the_name_as_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "").unwrap();
        let seeds = vec!["seeds.test:7000".to_string()];
        let mut rx = watch(
            seeds,
            Resolver::new(Some(file.clone())),
            Duration::from_millis(20),
        )
        .await
        .unwrap();
        assert!(
            rx.borrow().is_empty(),
            "nothing to resolve yet, and no error"
        );
        std::fs::write(&file, "127.0.0.1 seeds.test\n127.0.0.2 seeds.test\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().len(), 2);
        let malformed = watch(
            vec!["no-port".into()],
            Resolver::new(None),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(malformed, Err(SeedError::Malformed(_))));
    }
}
