//! Flow identity and bookkeeping: [`FlowId`], [`FlowKey`], [`CloseReason`] and the
//! [`FlowTable`] that maps a TCP 4-tuple seen on the TUN to the engine's per-flow state.
//!
//! This file owns no sockets and no I/O; the engine (`mod.rs`) drives the state kept here.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::net::SocketAddr;

/// A flow's identity inside one engine: small, copyable, never reused while the engine lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The TCP 4-tuple of a flow as the local app sees it: `src` is the app's socket, `dst` the
/// private address and port it connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The app's address and port (the TUN side of the host).
    pub src: SocketAddr,
    /// The destination inside the routed CIDRs.
    pub dst: SocketAddr,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

/// Why a flow ended. Recorded in logs and counters; who was at fault is in each variant's doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions finished with FIN / EOF: the normal end.
    Finished,
    /// The local app reset the connection (RST from the TUN side).
    AppReset,
    /// The jump host could not connect to the destination (closed port, no route, refused).
    OpenRefused,
    /// The jump host forbids forwarding (`AllowTcpForwarding no` or a `permitopen` rule).
    OpenProhibited,
    /// The local app did not accept a cloud caller's connection (`--expose`): its port is
    /// closed, or it did not answer within the open timeout.
    LocalRefused,
    /// The channel did not open in time (the destination is probably black-holed).
    OpenTimedOut,
    /// The channel was closed by the jump host before it sent EOF (the remote side reset).
    RemoteReset,
    /// The SSH connection to the jump host was lost.
    SessionLost,
    /// The concurrent flow limit (`--max-flows`) was reached when this flow's SYN arrived.
    FlowLimit,
    /// Too many channel opens were pending at the jump host when this flow's SYN arrived
    /// (a burst of connections to destinations that do not answer, or a SYN flood).
    OpenLimit,
    /// The TCP stack timed the connection out (the app vanished without closing).
    TimedOut,
    /// mse-vpn is shutting down.
    Shutdown,
    /// The direct path (a destination outside the VPC, `mse-vpn run`): the destination
    /// refused this host's connection (its port is closed).
    HostRefused,
    /// The direct path: this host could not reach the destination (no route, unreachable,
    /// timed out, or out of descriptors).
    HostUnreachable,
}

impl CloseReason {
    /// True if the flow's channel is closed only after what was handed over for it is
    /// written (a normal end: FIN both ways). Every other end is a reset: what the flow still
    /// holds is discarded and its channel closed at once, as the kernel discards a reset
    /// connection's unsent bytes.
    pub fn flushes(self) -> bool {
        self == CloseReason::Finished
    }

    /// True for the reasons that are an ordinary end of a flow (not worth a warning).
    pub fn is_normal(self) -> bool {
        matches!(
            self,
            CloseReason::Finished | CloseReason::AppReset | CloseReason::Shutdown
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            CloseReason::Finished => "finished",
            CloseReason::AppReset => "reset by the local app",
            CloseReason::OpenRefused => "the jump host could not connect to the destination",
            CloseReason::OpenProhibited => "the jump host forbids TCP forwarding",
            CloseReason::LocalRefused => {
                "the local app did not accept the connection (is it listening on 0.0.0.0?)"
            }
            CloseReason::OpenTimedOut => "the channel open timed out",
            CloseReason::RemoteReset => "closed by the jump host before EOF",
            CloseReason::SessionLost => "the SSH connection was lost",
            CloseReason::FlowLimit => "the concurrent flow limit (--max-flows) was reached",
            CloseReason::OpenLimit => "too many connections were being opened at once",
            CloseReason::TimedOut => "the TCP connection timed out",
            CloseReason::Shutdown => "mse-vpn is shutting down",
            CloseReason::HostRefused => "the destination refused the connection (direct)",
            CloseReason::HostUnreachable => {
                "the destination is unreachable from this host (direct)"
            }
        };
        f.write_str(s)
    }
}

/// A table keyed both by [`FlowId`] (for the SSH side) and by [`FlowKey`] (for packets).
#[derive(Debug)]
pub struct FlowTable<T> {
    /// Hashed with fixed keys: the engine walks the flows in this map's order, and that order
    /// must be the same in every run for a seeded run to replay bit-exact. The ids are the
    /// engine's own counter, nothing an app chooses.
    by_id: HashMap<FlowId, T, BuildHasherDefault<DefaultHasher>>,
    by_key: HashMap<FlowKey, FlowId>,
    /// The inbound flows among them (a budget of their own).
    inbound: HashSet<FlowId>,
    next_id: u64,
}

impl<T> Default for FlowTable<T> {
    fn default() -> Self {
        FlowTable {
            by_id: HashMap::default(),
            by_key: HashMap::new(),
            inbound: HashSet::new(),
            next_id: 1,
        }
    }
}

impl<T> FlowTable<T> {
    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when no flow is live.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Inserts a new flow for `key`, built by `make` from its fresh id.
    pub fn insert(&mut self, key: FlowKey, make: impl FnOnce(FlowId) -> T) -> FlowId {
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.by_id.insert(id, make(id));
        self.by_key.insert(key, id);
        id
    }

    /// [`FlowTable::insert`] for an inbound flow (counted in [`FlowTable::inbound_len`]).
    pub fn insert_inbound(&mut self, key: FlowKey, make: impl FnOnce(FlowId) -> T) -> FlowId {
        let id = self.insert(key, make);
        self.inbound.insert(id);
        id
    }

    /// True if `id` is a live inbound flow.
    pub fn is_inbound(&self, id: FlowId) -> bool {
        self.inbound.contains(&id)
    }

    /// Number of live inbound flows.
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }

    /// The flow currently using `key`, if any.
    pub fn id_of(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// Shared access by id.
    pub fn get(&self, id: FlowId) -> Option<&T> {
        self.by_id.get(&id)
    }

    /// Mutable access by id.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut T> {
        self.by_id.get_mut(&id)
    }

    /// Removes a flow; `key` must be the key it was inserted with.
    pub fn remove(&mut self, id: FlowId, key: &FlowKey) -> Option<T> {
        if self.by_key.get(key) == Some(&id) {
            self.by_key.remove(key);
        }
        self.inbound.remove(&id);
        self.by_id.remove(&id)
    }

    /// All live flow ids (in no particular order).
    pub fn ids(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.by_id.keys().copied()
    }

    /// Iterates over all flows.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &T)> + '_ {
        self.by_id.iter().map(|(id, f)| (*id, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: FlowKey = FlowKey {
        src: SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 1)),
            40000,
        ),
        dst: SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 10)),
            80,
        ),
    };

    #[test]
    fn ids_are_unique_and_lookups_agree() {
        let mut t: FlowTable<&'static str> = FlowTable::default();
        let a = t.insert(KEY_A, |_| "a");
        assert_eq!(t.id_of(&KEY_A), Some(a));
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.remove(a, &KEY_A), Some("a"));
        assert!(t.id_of(&KEY_A).is_none());
        let b = t.insert(KEY_A, |_| "b");
        assert_ne!(a, b, "ids are never reused");
        assert_eq!(t.len(), 1);
        let key_c = FlowKey {
            dst: KEY_A.src,
            src: KEY_A.dst,
        };
        let c = t.insert_inbound(key_c, |_| "c");
        assert_eq!((t.len(), t.inbound_len()), (2, 1));
        t.remove(c, &key_c);
        assert_eq!(
            (t.len(), t.inbound_len()),
            (1, 0),
            "inbound count follows removal"
        );
    }
}
