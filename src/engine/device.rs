//! A smoltcp [`Device`] made of two packet queues: `rx` holds packets the driver read from the
//! TUN (or the engine injected), `tx` holds packets smoltcp produced for the TUN.
//!
//! No OS access: the driver moves packets between these queues and the TUN file.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// A received packet: bytes `start..len` of `buf`. The buffer is usually longer (a pooled
/// buffer the TUN was read into, see [`QueueDevice::rx_spare`]), and `start` skips the
/// header the TUN put in front.
#[derive(Debug)]
pub struct RxPacket {
    /// The buffer.
    pub buf: Vec<u8>,
    /// Where the IP packet starts.
    pub start: usize,
    /// Where it ends.
    pub len: usize,
}

impl RxPacket {
    /// The packet's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(self.start..self.len).unwrap_or_default()
    }
}

impl From<Vec<u8>> for RxPacket {
    fn from(buf: Vec<u8>) -> RxPacket {
        RxPacket {
            start: 0,
            len: buf.len(),
            buf,
        }
    }
}

/// How packets look on the TUN: a header in front of each (Linux's virtio-net header when
/// the TUN has one), and whether TCP checksums are offloaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunFormat {
    /// Bytes of header before each packet (0, or [`VNET_HDR_LEN`]).
    pub header: usize,
    /// TCP checksums are neither verified nor computed: packets to the TUN carry only the
    /// pseudo-header sum and a virtio-net header asking for the rest
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), which the kernel honours for local delivery without
    /// ever computing it, and computes for a packet it forwards elsewhere.
    pub checksum_offload: bool,
}

/// The size of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const VNET_F_NEEDS_CSUM: u8 = 1;
/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_AT: usize = 16;

/// Writes the virtio-net header in front of `packet` (`buf[..header]`), and for TCP with
/// offload the pseudo-header sum into its checksum field.
fn finish_tx(format: TunFormat, buf: &mut [u8]) {
    if format.header != VNET_HDR_LEN {
        return;
    }
    let (hdr, packet) = buf.split_at_mut(VNET_HDR_LEN);
    hdr.fill(0);
    if !format.checksum_offload {
        return;
    }
    let Some((ip_len, sum)) = tcp_pseudo_sum(packet) else {
        return;
    };
    let Some(field) = packet.get_mut(ip_len + TCP_CHECKSUM_AT..ip_len + TCP_CHECKSUM_AT + 2) else {
        return;
    };
    field.copy_from_slice(&sum.to_be_bytes());
    // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (legacy virtio-net: the
    // host's byte order).
    hdr[0] = VNET_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&(ip_len as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&(TCP_CHECKSUM_AT as u16).to_ne_bytes());
}

/// For a TCP packet: its IP header length and the folded (not complemented) sum of its
/// pseudo-header, as a `CHECKSUM_PARTIAL` checksum field holds it.
fn tcp_pseudo_sum(packet: &[u8]) -> Option<(usize, u16)> {
    let mut sum: u32 = 0;
    let add = |sum: &mut u32, bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            *sum += hi | pair.get(1).map_or(0, |b| u32::from(*b));
        }
    };
    let ip_len = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if *packet.get(9)? != 6 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            add(&mut sum, packet.get(12..20)?);
            sum += 6 + u32::try_from(total.checked_sub(ihl)?).ok()?;
            ihl
        }
        6 => {
            if *packet.get(6)? != 6 {
                return None;
            }
            let payload = u32::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]));
            add(&mut sum, packet.get(8..40)?);
            sum += 6 + payload;
            40
        }
        _ => return None,
    };
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    Some((ip_len, sum as u16))
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
    /// How packets look on the TUN.
    format: TunFormat,
}

impl QueueDevice {
    /// A device whose largest packet is `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        QueueDevice::with_format(mtu, TunFormat::default())
    }

    /// A device for a TUN whose packets look like `format`.
    pub fn with_format(mtu: usize, format: TunFormat) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            spare: Vec::new(),
            rx_spare: Vec::new(),
            rx_len: rx_buffer_len(mtu),
            format,
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

    /// Frees the pooled packet and read buffers.
    pub fn drop_spares(&mut self) {
        self.spare = Vec::new();
        self.rx_spare = Vec::new();
    }

    /// Pooled packet and read buffers held now.
    #[cfg(test)]
    pub(crate) fn spares(&self) -> usize {
        self.spare.len() + self.rx_spare.len()
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
                format: self.format,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
            format: self.format,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The engine verifies TCP checksums while classifying each packet and the kernel
        // verified the IP header: smoltcp only computes checksums on transmit, and not even
        // TCP's with offload (see `TunFormat`).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = if self.format.checksum_offload {
            Checksum::None
        } else {
            Checksum::Tx
        };
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
    format: TunFormat,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.spare.pop().unwrap_or_default();
        // Only growth is zero-filled; what is kept is overwritten by `f`.
        let header = self.format.header;
        buf.resize(header + len, 0);
        let r = f(&mut buf[header..]);
        finish_tx(self.format, &mut buf);
        self.tx.push_back(buf);
        r
    }
}

/// `packet` with the TUN's header in front (for packets the engine builds itself, whose
/// checksums are complete).
pub fn with_header(format: TunFormat, packet: Vec<u8>) -> Vec<u8> {
    if format.header == 0 {
        return packet;
    }
    let mut buf = vec![0; format.header];
    buf.extend_from_slice(&packet);
    buf
}

#[cfg(test)]
mod tests {
    use smoltcp::phy::TxToken as _;
    use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpPacket};

    use super::*;

    #[test]
    fn an_offloaded_tcp_packet_carries_the_partial_sum_and_a_needs_csum_header() {
        let format = TunFormat {
            header: VNET_HDR_LEN,
            checksum_offload: true,
        };
        let mut dev = QueueDevice::with_format(1500, format);
        let (src, dst) = (
            Ipv4Address::new(10, 0, 0, 10),
            Ipv4Address::new(198, 18, 0, 1),
        );
        let payload = b"hello through the tunnel";
        let tcp_len = 20 + payload.len();
        let token = dev.transmit(Instant::from_millis(0)).unwrap();
        token.consume(20 + tcp_len, |buf| {
            let ip = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: IpProtocol::Tcp,
                payload_len: tcp_len,
                hop_limit: 64,
            };
            let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
            ip.emit(&mut p, &ChecksumCapabilities::default());
            let mut t = TcpPacket::new_unchecked(p.payload_mut());
            t.set_src_port(80);
            t.set_dst_port(40000);
            t.set_header_len(20);
            t.payload_mut().copy_from_slice(payload);
            t.set_checksum(0xdead); // smoltcp leaves it alone with offload
        });
        let out = dev.tx.pop_front().unwrap();
        let (hdr, packet) = out.split_at(VNET_HDR_LEN);
        assert_eq!(hdr[0], VNET_F_NEEDS_CSUM);
        assert_eq!(u16::from_ne_bytes([hdr[6], hdr[7]]), 20, "csum_start");
        assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), 16, "csum_offset");
        // What the kernel does: sum from csum_start to the end (the field holds the
        // pseudo-header sum), complement, store. The result must be the real checksum.
        let mut done = packet.to_vec();
        let mut sum: u32 = 0;
        for pair in done[20..].chunks(2) {
            sum += (u32::from(pair[0]) << 8) | pair.get(1).map_or(0, |b| u32::from(*b));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        done[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let ip = Ipv4Packet::new_checked(&done[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)));
    }

    #[test]
    fn without_offload_the_header_is_zero_and_packets_are_untouched() {
        let format = TunFormat {
            header: VNET_HDR_LEN,
            checksum_offload: false,
        };
        let mut dev = QueueDevice::with_format(1500, format);
        let token = dev.transmit(Instant::from_millis(0)).unwrap();
        token.consume(4, |buf| buf.copy_from_slice(&[0x45, 1, 2, 3]));
        assert_eq!(
            dev.tx.pop_front().unwrap(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x45, 1, 2, 3]
        );
        assert_eq!(
            with_header(format, vec![9]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]
        );
    }
}
