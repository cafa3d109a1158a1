//! A smoltcp [`Device`] made of two packet queues: `rx` holds packets the driver read from the
//! TUN (or the engine injected), `tx` holds packets smoltcp produced for the TUN.
//!
//! No OS access: the driver moves packets between these queues and the TUN file.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Two queues of raw IP packets.
#[derive(Debug)]
pub struct QueueDevice {
    /// Packets waiting to be processed by smoltcp.
    pub rx: VecDeque<Vec<u8>>,
    /// Packets smoltcp emitted, waiting to be written to the TUN.
    pub tx: VecDeque<Vec<u8>>,
    mtu: usize,
    /// Buffers of sent packets, reused for the next transmission (no per-packet allocation
    /// in steady state).
    spare: Vec<Vec<u8>>,
}

impl QueueDevice {
    /// A device whose largest packet is `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            spare: Vec::new(),
        }
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

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken { packet },
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

/// A received packet handed to smoltcp.
pub struct RxToken {
    packet: Vec<u8>,
}

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.packet)
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
