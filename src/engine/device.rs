//! A smoltcp [`Device`] made of two packet queues: `rx` holds packets the driver read from the
//! TUN (or the engine injected), `tx` holds packets smoltcp produced for the TUN.
//!
//! No OS access: the driver moves packets between these queues and the TUN file.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// A received packet: the first `len` bytes of `buf`. The buffer is usually longer (a
/// pooled buffer the TUN was read into, see [`QueueDevice::rx_spare`]).
#[derive(Debug)]
pub struct RxPacket {
    /// The buffer.
    pub buf: Vec<u8>,
    /// The packet's length.
    pub len: usize,
}

impl RxPacket {
    /// The packet's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&self.buf)
    }
}

impl From<Vec<u8>> for RxPacket {
    fn from(buf: Vec<u8>) -> RxPacket {
        RxPacket {
            len: buf.len(),
            buf,
        }
    }
}

/// Most read buffers a pool keeps.
const RX_POOL: usize = 64;

/// Two queues of raw IP packets.
#[derive(Debug)]
pub struct QueueDevice {
    /// Packets waiting to be processed by smoltcp.
    pub rx: VecDeque<RxPacket>,
    /// Packets smoltcp emitted, waiting to be written to the TUN.
    pub tx: VecDeque<Vec<u8>>,
    mtu: usize,
    /// Buffers of sent packets, reused for the next transmission (no per-packet allocation
    /// in steady state).
    spare: Vec<Vec<u8>>,
    /// Read buffers (of `rx_len` bytes) of received packets smoltcp has processed, for the
    /// driver's next TUN reads: kept at their full length, so a read never zero-fills or
    /// copies (see [`RxPacket`]).
    pub rx_spare: Vec<Vec<u8>>,
    /// The length of a pooled read buffer.
    rx_len: usize,
}

impl QueueDevice {
    /// A device whose largest packet is `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            spare: Vec::new(),
            rx_spare: Vec::new(),
            rx_len: rx_buffer_len(mtu),
        }
    }

    /// A read buffer of [`rx_buffer_len`] bytes: a pooled one, or a new (zeroed) one.
    pub fn rx_buffer(&mut self) -> Vec<u8> {
        self.rx_spare.pop().unwrap_or_else(|| vec![0; self.rx_len])
    }

    /// Gives a read buffer back to the pool (only full-size ones are kept).
    pub fn recycle_rx(&mut self, buf: Vec<u8>) {
        recycle_rx(&mut self.rx_spare, self.rx_len, buf);
    }

    /// Returns a packet buffer to the pool once the driver wrote it to the TUN.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        // Kept at its length: a buffer reused for a packet of the same size (the common
        // case in a bulk transfer) is not zero-filled again; smoltcp writes every byte.
        if self.spare.len() < 64 {
            self.spare.push(buf);
        }
    }

    /// The pool of spare packet buffers (several devices can take turns with one pool by
    /// swapping it in before they run).
    pub fn spare_mut(&mut self) -> &mut Vec<Vec<u8>> {
        &mut self.spare
    }
}

/// The length of a read buffer for packets of up to `mtu` bytes (with room for a header the
/// TUN may put in front).
pub fn rx_buffer_len(mtu: usize) -> usize {
    mtu + 64
}

fn recycle_rx(pool: &mut Vec<Vec<u8>>, rx_len: usize, buf: Vec<u8>) {
    if buf.len() == rx_len && pool.len() < RX_POOL {
        pool.push(buf);
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken {
                packet,
                pool: &mut self.rx_spare,
                rx_len: self.rx_len,
            },
            TxToken {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The engine verifies TCP checksums while classifying each packet and the kernel
        // verified the IP header: smoltcp only computes checksums on transmit.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// A received packet handed to smoltcp; its buffer goes back to the pool afterwards.
pub struct RxToken<'a> {
    packet: RxPacket,
    pool: &'a mut Vec<Vec<u8>>,
    rx_len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(self.packet.bytes());
        recycle_rx(self.pool, self.rx_len, self.packet.buf);
        r
    }
}

/// A slot in the transmit queue.
pub struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.spare.pop().unwrap_or_default();
        // Only growth is zero-filled; what is kept is overwritten by `f`.
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}
