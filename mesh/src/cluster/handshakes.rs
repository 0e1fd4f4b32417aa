//! Handshakes on the mesh endpoint, bounded before they cost the node more than a stateless
//! packet. Anyone who reaches the port can start one, certificate or not, and a handshake holds
//! TLS and connection state until it ends, so:
//! - an address that has not shown it receives our packets gets a Retry (one stateless packet
//!   carrying a token), never a handshake: a flood from forged addresses holds nothing, and
//!   cannot use up a real address's share;
//! - a shown address holds at most [`HANDSHAKES_PER_ADDRESS`] handshakes at once, and every
//!   address together `mesh.max_handshakes`, except the addresses of the mesh's members: many
//!   hosts together can fill the node's share, and would keep the mesh itself out;
//! - a handshake has [`HANDSHAKE_TIMEOUT`] to finish, however often its peer shows signs of
//!   life.
//!
//! Mesh connections are pooled and long-lived, so the round trip a Retry adds is paid once per
//! connection, not per request.

use super::connections::{ConnectionCounts, Held};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes one address may have in progress at once. A node dials a peer on one pooled
/// connection, and clients behind one address (a NAT) connect a few at a time: this leaves them
/// room while one host cannot take the node's whole share.
pub const HANDSHAKES_PER_ADDRESS: usize = 16;

/// How long a handshake may take, as long as a dialling node waits for one
/// (`transport::CONNECT_TIMEOUT`): past it, the dialler has given up anyway.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Handshakes in progress, by address and in all.
pub struct Handshakes {
    in_progress: Arc<Semaphore>,
    by_address: ConnectionCounts<IpAddr>,
}

/// The places one handshake holds, given back when it is dropped: once it has finished,
/// failed or run out of time.
#[derive(Debug)]
pub struct Handshake {
    /// None for a member's address, which the node's cap does not hold.
    _in_progress: Option<OwnedSemaphorePermit>,
    _address: Held<IpAddr>,
}

/// Why a connection attempt gets no handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Turned {
    /// The attempt's source address is not shown to be the sender's: answer with a Retry.
    #[error("its address is not yet shown to be the sender's")]
    Unproven,
    /// The address holds [`HANDSHAKES_PER_ADDRESS`] handshakes already.
    #[error("its address has {HANDSHAKES_PER_ADDRESS} handshakes in progress already")]
    AddressBusy,
    /// The node holds `mesh.max_handshakes` handshakes already.
    #[error("the node has mesh.max_handshakes handshakes in progress already")]
    Busy,
}

impl Handshakes {
    /// At most `max` handshakes in progress at once.
    pub fn new(max: usize) -> Handshakes {
        Handshakes {
            in_progress: Arc::new(Semaphore::new(max)),
            by_address: ConnectionCounts::default(),
        }
    }

    /// A handshake for an attempt from `address`, whose sender has `proven` that it receives
    /// packets sent there (a Retry's token came back), unless one of the bounds turns it away.
    /// The address of a `member` of the mesh is held to its own share only.
    pub fn admit(&self, address: IpAddr, proven: bool, member: bool) -> Result<Handshake, Turned> {
        if !proven {
            return Err(Turned::Unproven);
        }
        let address = self
            .by_address
            .hold(holder(address), HANDSHAKES_PER_ADDRESS)
            .ok_or(Turned::AddressBusy)?;
        let in_progress = if member {
            None
        } else {
            let permit = self.in_progress.clone().try_acquire_owned();
            Some(permit.map_err(|_| Turned::Busy)?)
        };
        Ok(Handshake {
            _in_progress: in_progress,
            _address: address,
        })
    }
}

/// Whom an address's handshakes count against: an IPv4 address (IPv4-mapped ones included),
/// or an IPv6 /64, the block one host is commonly given.
fn holder(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn an_unproven_address_gets_no_handshake_however_idle_the_node() {
        let handshakes = Handshakes::new(4);
        assert_eq!(
            handshakes.admit(v4(1), false, false).unwrap_err(),
            Turned::Unproven
        );
        assert!(handshakes.admit(v4(1), true, false).is_ok());
    }

    #[test]
    fn one_address_holds_its_share_and_the_node_its_cap_until_handshakes_end() {
        let handshakes = Handshakes::new(HANDSHAKES_PER_ADDRESS + 2);
        let mut held: Vec<Handshake> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| handshakes.admit(v4(1), true, false).unwrap())
            .collect();
        assert_eq!(
            handshakes.admit(v4(1), true, false).unwrap_err(),
            Turned::AddressBusy
        );
        let others = [
            handshakes.admit(v4(2), true, false).unwrap(),
            handshakes.admit(v4(3), true, false).unwrap(),
        ];
        assert_eq!(
            handshakes.admit(v4(4), true, false).unwrap_err(),
            Turned::Busy,
            "every address together holds the node's cap"
        );
        for _ in 0..2 * HANDSHAKES_PER_ADDRESS {
            assert_eq!(
                handshakes.admit(v4(4), true, false).unwrap_err(),
                Turned::Busy
            );
        }
        held.pop();
        let fourth = handshakes
            .admit(v4(4), true, false)
            .expect("a place given back is anyone's");
        assert_eq!(
            handshakes.admit(v4(1), true, false).unwrap_err(),
            Turned::Busy
        );
        drop((held, others, fourth));
        let _fourth: Vec<Handshake> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| {
                handshakes
                    .admit(v4(4), true, false)
                    .expect("attempts refused at the node's cap left no count behind")
            })
            .collect();
    }

    #[test]
    fn a_members_address_is_held_to_its_share_and_not_the_nodes_cap() {
        let handshakes = Handshakes::new(1);
        let _stranger = handshakes.admit(v4(1), true, false).unwrap();
        assert_eq!(
            handshakes.admit(v4(2), true, false).unwrap_err(),
            Turned::Busy
        );
        let _member: Vec<Handshake> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| handshakes.admit(v4(3), true, true).unwrap())
            .collect();
        assert_eq!(
            handshakes.admit(v4(3), true, true).unwrap_err(),
            Turned::AddressBusy
        );
        assert_eq!(
            handshakes.admit(v4(3), false, true).unwrap_err(),
            Turned::Unproven,
            "an address not shown to be the sender's is nobody's, a member's included"
        );
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_a_mapped_ipv4_as_itself() {
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, last]);
        assert_eq!(holder(host(1)), holder(host(0xffff)));
        assert_ne!(
            holder(host(1)),
            holder(IpAddr::from([0x2001, 0xdb8, 0, 8, 0, 0, 0, 1]))
        );
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(holder(mapped), v4(1));
        let handshakes = Handshakes::new(usize::MAX >> 4);
        let _held: Vec<Handshake> = (0..HANDSHAKES_PER_ADDRESS as u16)
            .map(|i| handshakes.admit(host(i), true, false).unwrap())
            .collect();
        assert_eq!(
            handshakes.admit(host(999), true, false).unwrap_err(),
            Turned::AddressBusy
        );
    }
}
