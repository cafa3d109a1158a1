//! The engine's TCP sockets, recycled.
//!
//! Each flow's socket owns a receive and a send ring buffer of [`EngineConfig::tcp_buffer`]
//! bytes. They are large (the receive buffer is the flow's TCP window) and come straight from
//! `mmap` (see `platform::sys::pin_mmap_threshold`), so a short connection (an HTTP request
//! with `Connection: close`, a health check, a registry lookup) paid for two `mmap`s, their
//! first-touch page faults and two `munmap`s: measured as about a fifth of mse-vpn's CPU per
//! connection under `wrk -H 'Connection: close'`. A closed socket whose flow moved little is
//! kept instead and reused by the next flow; its buffers stay mapped with only a few pages
//! touched, so the spares cost at most [`SPARES`] × ([`REUSE_MAX_MOVED`] + 2 pages) of memory,
//! and only until the relay next gives freed memory back ([`super::Engine::drop_spares`]).
//! A bulk flow's socket (every page touched) is freed as before.
//!
//! smoltcp clears a socket's connection state when it listens or connects again (with our
//! patch `patches/smoltcp/0001`, all of it); the settings it keeps are set again in
//! [`SocketPool::take`].
//!
//! [`EngineConfig::tcp_buffer`]: super::EngineConfig::tcp_buffer

use std::cell::Cell;

use smoltcp::socket::{Socket, tcp};
use smoltcp::time::Instant;

/// TCP timestamps (RFC 7323) for the app's side of each flow, in milliseconds of the engine's
/// clock (any monotonic clock of 1 ms to 1 s per tick will do).
///
/// Without them an app's kernel cannot reuse the TIME-WAIT ports of its closed connections
/// through mse-vpn (`net.ipv4.tcp_tw_reuse` needs the peer's timestamps to be safe): a
/// client making thousands of short connections a second ran out of ports after a few
/// seconds (measured: `wrk -H 'Connection: close'` fell from 4,000 to 260 requests/s, while
/// the same load through `ssh -L` and direct routing, whose peers send timestamps, did not).
/// They also give the app's kernel an RTT sample per ACK. smoltcp asks for a value as it
/// builds each segment, through a plain `fn()` that can carry no state: the engine's `now`
/// reaches it through [`set_clock`], called before every smoltcp poll (smoltcp builds
/// segments only while it is polled), so the engine reads no clock of its own and a test
/// replays bit-exact.
fn tsval() -> u32 {
    CLOCK_MS.with(Cell::get)
}

// The `now` of the smoltcp poll running on this thread, in milliseconds (see [`tsval`]).
// Its initializer is `const` already: clippy 1.96 (Debian's, used by scripts/cross-check)
// still reports `missing_const_for_thread_local` here, 1.95 does not.
#[allow(clippy::missing_const_for_thread_local)]
mod clock {
    use std::cell::Cell;

    thread_local! {
        pub(super) static CLOCK_MS: Cell<u32> = const { Cell::new(0) };
    }
}
use clock::CLOCK_MS;

/// The time of the smoltcp poll about to run on this thread (see [`tsval`]).
pub(super) fn set_clock(now: Instant) {
    CLOCK_MS.with(|c| c.set(now.total_millis() as u32));
}

/// Spare sockets kept at most.
pub(super) const SPARES: usize = 64;
/// A closed socket is kept only if its flow moved at most this many bytes (both ways): the
/// pages of its buffers it touched stay resident while it waits.
pub(super) const REUSE_MAX_MOVED: u64 = 64 * 1024;

/// Closed TCP sockets ready for the next flow.
pub(super) struct SocketPool {
    spares: Vec<tcp::Socket<'static>>,
    buffer: usize,
    /// See [`super::EngineConfig::ack_delay`].
    ack_delay: Option<smoltcp::time::Duration>,
    /// Sockets taken from the spares rather than allocated (for tests and stats).
    pub(super) reused: u64,
}

impl SocketPool {
    /// A pool of sockets with `buffer` bytes of receive and of send buffer each, delaying
    /// ACKs by `ack_delay`.
    pub(super) fn new(buffer: usize, ack_delay: Option<smoltcp::time::Duration>) -> SocketPool {
        SocketPool {
            spares: Vec::new(),
            buffer,
            ack_delay,
            reused: 0,
        }
    }

    /// A closed socket with the engine's settings: Nagle off, ACKs delayed as configured, no
    /// timeout, no keep-alive.
    pub(super) fn take(&mut self) -> tcp::Socket<'static> {
        let mut socket = match self.spares.pop() {
            Some(socket) => {
                self.reused += 1;
                socket
            }
            None => tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; self.buffer]),
                tcp::SocketBuffer::new(vec![0; self.buffer]),
            ),
        };
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(self.ack_delay);
        socket.set_timeout(None);
        socket.set_keep_alive(None);
        socket.set_hop_limit(None);
        // smoltcp drops the generator for a peer that does not offer timestamps: set it again.
        socket.set_tsval_generator(Some(tsval));
        socket
    }

    /// Takes back a socket removed from its socket set, whose flow moved `moved` bytes: kept
    /// for reuse if it touched little of its buffers and the pool has room, freed otherwise.
    /// It is closed here without sending anything (it is no longer polled).
    pub(super) fn give(&mut self, socket: Socket<'static>, moved: u64) {
        if moved > REUSE_MAX_MOVED || self.spares.len() >= SPARES {
            return;
        }
        #[allow(irrefutable_let_patterns)] // only TCP sockets are built in (Cargo features)
        if let Socket::Tcp(mut socket) = socket {
            socket.abort();
            self.spares.push(socket);
        }
    }

    /// Spare sockets held right now.
    #[cfg(test)]
    pub(super) fn spares(&self) -> usize {
        self.spares.len()
    }

    /// Frees the spare sockets (see [`super::Engine::drop_spares`]).
    pub(super) fn drop_spares(&mut self) {
        self.spares = Vec::new();
    }
}
