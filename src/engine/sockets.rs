//! The engine's TCP sockets, recycled.
//!
//! Each flow's socket owns a receive and a send ring buffer of [`EngineConfig::tcp_buffer`]
//! bytes. They are large (the receive buffer is the flow's TCP window) and come straight from
//! `mmap` (see `platform::sys::pin_mmap_threshold`), so a short connection (an HTTP request
//! with `Connection: close`, a health check, a registry lookup) paid for two `mmap`s, their
//! first-touch page faults and two `munmap`s: measured as about a fifth of mse-vpn's CPU per
//! connection under `wrk -H 'Connection: close'`. A closed socket whose flow moved little is
//! kept instead and reused by the next flow; its buffers stay mapped with only a few pages
//! touched, so the spares cost at most [`SPARES`] × ([`REUSE_MAX_MOVED`] + 2 pages) of memory.
//! A bulk flow's socket (every page touched) is freed as before.
//!
//! smoltcp clears a socket's connection state when it listens or connects again (with our
//! patch `patches/smoltcp/0001`, all of it); the settings it keeps are set again in
//! [`SocketPool::take`].
//!
//! [`EngineConfig::tcp_buffer`]: super::EngineConfig::tcp_buffer

use smoltcp::socket::{Socket, tcp};

/// Spare sockets kept at most.
pub(super) const SPARES: usize = 64;
/// A closed socket is kept only if its flow moved at most this many bytes (both ways): the
/// pages of its buffers it touched stay resident while it waits.
pub(super) const REUSE_MAX_MOVED: u64 = 64 * 1024;

/// Closed TCP sockets ready for the next flow.
pub(super) struct SocketPool {
    spares: Vec<tcp::Socket<'static>>,
    buffer: usize,
    /// Sockets taken from the spares rather than allocated (for tests and stats).
    pub(super) reused: u64,
}

impl SocketPool {
    /// A pool of sockets with `buffer` bytes of receive and of send buffer each.
    pub(super) fn new(buffer: usize) -> SocketPool {
        SocketPool {
            spares: Vec::new(),
            buffer,
            reused: 0,
        }
    }

    /// A closed socket with the engine's settings: Nagle and delayed ACK off, no timeout,
    /// no keep-alive.
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
        socket.set_ack_delay(None);
        socket.set_timeout(None);
        socket.set_keep_alive(None);
        socket.set_hop_limit(None);
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
}
