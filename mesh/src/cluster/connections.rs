//! Connections (or handshakes) held open, counted by who holds them, so that one holder cannot
//! take what the others need. Bookkeeping only: the accept loop asks for a place, and a
//! connection's place is given back when its [`Held`] is dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Who holds a node connection: a digest of the certificate it was made with.
pub type Holder = [u8; 32];

/// Open connections by holder: a certificate's digest ([`Holder`]), or an address.
#[derive(Debug)]
pub struct ConnectionCounts<K = Holder>(Arc<Mutex<HashMap<K, usize>>>);

impl<K> Default for ConnectionCounts<K> {
    fn default() -> Self {
        ConnectionCounts(Arc::default())
    }
}

impl<K> Clone for ConnectionCounts<K> {
    fn clone(&self) -> Self {
        ConnectionCounts(self.0.clone())
    }
}

/// One counted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Held<K: Hash + Eq = Holder> {
    counts: ConnectionCounts<K>,
    holder: K,
}

impl<K: Hash + Eq + Copy> ConnectionCounts<K> {
    /// Counts one more connection for `holder`, unless it holds `limit` already.
    pub fn hold(&self, holder: K, limit: usize) -> Option<Held<K>> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.get(&holder).copied().unwrap_or(0);
        if count >= limit {
            return None;
        }
        counts.insert(holder, count + 1);
        Some(Held {
            counts: self.clone(),
            holder,
        })
    }
}

impl<K: Hash + Eq> Drop for Held<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.holder) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_gets_its_limit_and_its_places_back_as_connections_close() {
        let counts = ConnectionCounts::default();
        let (a, b) = ([1; 32], [2; 32]);
        let mut held: Vec<Held> = (0..3).map(|_| counts.hold(a, 3).unwrap()).collect();
        assert!(counts.hold(a, 3).is_none(), "a fourth for a limit of three");
        let _other = counts
            .hold(b, 3)
            .expect("another holder is not held to a's count");
        held.pop();
        held.push(
            counts
                .hold(a, 3)
                .expect("a closed connection gives its place back"),
        );
        assert!(counts.hold(a, 3).is_none(), "only the one place came back");
        assert!(
            counts.hold([3; 32], 0).is_none(),
            "a limit of none holds none"
        );
    }

    #[test]
    fn holders_with_nothing_open_are_forgotten() {
        let counts = ConnectionCounts::default();
        for round in 0..1000u32 {
            let mut holder = [0; 32];
            holder[..4].copy_from_slice(&round.to_le_bytes());
            let held = counts.hold(holder, 8).unwrap();
            assert_eq!(counts.0.lock().unwrap().len(), 1);
            drop(held);
        }
        assert_eq!(
            counts.0.lock().unwrap().len(),
            0,
            "no entry kept for a holder with nothing open"
        );
    }
}
