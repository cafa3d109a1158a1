//! Classification of raw IP packets read from the TUN, the ICMP "unreachable" replies the
//! engine sends for traffic it does not carry, and the UDP datagrams it writes back for the
//! direct path ([`emit_udp`]).
//!
//! Untrusted bytes are only read through smoltcp's `Packet::new_checked` + `Repr::parse`
//! (checksums included). Nothing here allocates except the reply builder, and nothing panics
//! on any input.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable,
    Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet,
    Ipv6Repr, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::flow::FlowKey;

/// An IPv6 packet's fixed header: its payload starts there.
const IPV6_HEADER: usize = 40;
/// A UDP header.
const UDP_HEADER: usize = 8;
/// ICMPv6's echo request and reply types.
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// Why an ingress packet was dropped without a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (bad version, length or header checksum).
    Malformed,
    /// A TCP segment with a bad header or checksum.
    BadTcp,
    /// A UDP datagram with a bad header or checksum, or port 0.
    BadUdp,
    /// Multicast, broadcast or unspecified addresses: never answered.
    NotUnicast,
    /// An IPv4 fragment: the TUN MTU is large, so the kernel does not fragment towards us.
    Fragment,
    /// An ICMP error or other ICMP message: never answered with another ICMP error.
    Icmp,
}

/// TCP flags of interest for flow admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN set.
    pub syn: bool,
    /// ACK set.
    pub ack: bool,
    /// RST set.
    pub rst: bool,
}

impl TcpFlags {
    /// A connection request: SYN without ACK or RST.
    pub fn is_connect(self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// What to do with one packet read from the TUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// A valid TCP segment of the flow `key`.
    Tcp {
        /// The flow's 4-tuple.
        key: FlowKey,
        /// Its flags.
        flags: TcpFlags,
        /// Its sequence number (screened against the flow's receive window for RST and SYN).
        seq: TcpSeqNumber,
    },
    /// A valid UDP datagram: its payload is `packet[start..start + len]`. The engine carries
    /// it on the direct path, or answers it as [`Unreachable::Port`].
    Udp {
        /// The app's socket.
        src: SocketAddr,
        /// Where it is sent.
        dst: SocketAddr,
        /// Where its payload starts in the packet.
        start: usize,
        /// The payload's length.
        len: usize,
    },
    /// A valid ICMP or ICMPv6 echo request (ping): the ICMP message, header and data, is
    /// `packet[start..start + len]`. The engine carries it on the direct path, or answers it
    /// as [`Unreachable::Prohibited`].
    Echo {
        /// The app's address.
        src: IpAddr,
        /// The pinged address.
        dst: IpAddr,
        /// Its identifier (the app's ping socket).
        ident: u16,
        /// Its sequence number.
        seq: u16,
        /// Where the ICMP message starts in the packet.
        start: usize,
        /// The ICMP message's length.
        len: usize,
    },
    /// Traffic the tunnel does not carry (other protocols, a malformed echo request): answer
    /// with an ICMP destination-unreachable built by [`unreachable_reply`].
    Reject(Unreachable),
    /// Drop silently.
    Drop(DropReason),
}

/// The kind of ICMP unreachable to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// UDP: "port unreachable", so a connected UDP socket gets ECONNREFUSED at once.
    Port,
    /// ICMP echo and any other protocol: "administratively prohibited".
    Prohibited,
}

fn unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    }
}

/// Classifies one raw IP packet from the TUN. Never panics.
pub fn classify(packet: &[u8]) -> Ingress {
    classify_with(packet, true)
}

/// [`classify`], checking TCP and UDP checksums only if `verify` (with TUN checksum offload
/// the kernel hands over local packets whose checksum nobody computed).
pub fn classify_with(packet: &[u8], verify: bool) -> Ingress {
    let caps = ChecksumCapabilities::default();
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(ip) = Ipv4Packet::new_checked(packet) else {
                return Ingress::Drop(DropReason::Malformed);
            };
            let Ok(repr) = Ipv4Repr::parse(&ip, &caps) else {
                return Ingress::Drop(DropReason::Malformed);
            };
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Ingress::Drop(DropReason::Fragment);
            }
            let (src, dst) = (IpAddr::V4(repr.src_addr), IpAddr::V4(repr.dst_addr));
            let at = ip.header_len() as usize;
            let echo = |p: &[u8]| match Icmpv4Packet::new_checked(p) {
                Ok(i) if i.msg_type() == Icmpv4Message::EchoRequest => {
                    let ok = i.msg_code() == 0 && (!verify || i.verify_checksum());
                    Echo::of(ok, i.echo_ident(), i.echo_seq_no())
                }
                _ => Echo::Not,
            };
            transport(
                (src, dst),
                repr.next_header,
                (ip.payload(), at),
                verify,
                echo,
            )
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(packet) else {
                return Ingress::Drop(DropReason::Malformed);
            };
            let Ok(repr) = Ipv6Repr::parse(&ip) else {
                return Ingress::Drop(DropReason::Malformed);
            };
            let (src, dst) = (IpAddr::V6(repr.src_addr), IpAddr::V6(repr.dst_addr));
            let at = IPV6_HEADER;
            let (s, d) = (repr.src_addr, repr.dst_addr);
            let echo = |p: &[u8]| match Icmpv6Packet::new_checked(p) {
                Ok(i) if u8::from(i.msg_type()) == ECHO_REQUEST_V6 => {
                    let ok = i.msg_code() == 0 && (!verify || i.verify_checksum(&s, &d));
                    Echo::of(ok, i.echo_ident(), i.echo_seq_no())
                }
                _ => Echo::Not,
            };
            transport(
                (src, dst),
                repr.next_header,
                (ip.payload(), at),
                verify,
                echo,
            )
        }
        _ => Ingress::Drop(DropReason::Malformed),
    }
}

/// What an ICMP message is, for [`classify`].
enum Echo {
    /// An echo request with a valid code and checksum: its identifier and sequence number.
    Request(u16, u16),
    /// An echo request that is malformed.
    Bad,
    /// Anything else.
    Not,
}

impl Echo {
    /// An echo request, well-formed (`ok`) or not.
    fn of(ok: bool, ident: u16, seq: u16) -> Echo {
        if ok {
            Echo::Request(ident, seq)
        } else {
            Echo::Bad
        }
    }
}

/// The transport header of a well-formed IP packet; `payload` is the IP payload and where it
/// starts in the packet; `echo` tells an ICMP echo request.
fn transport(
    (src, dst): (IpAddr, IpAddr),
    proto: IpProtocol,
    (payload, at): (&[u8], usize),
    verify: bool,
    echo: impl FnOnce(&[u8]) -> Echo,
) -> Ingress {
    if !unicast(src) || !unicast(dst) {
        return Ingress::Drop(DropReason::NotUnicast);
    }
    match proto {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(payload) else {
                return Ingress::Drop(DropReason::BadTcp);
            };
            if verify && !tcp.verify_checksum(&src.into(), &dst.into()) {
                return Ingress::Drop(DropReason::BadTcp);
            }
            Ingress::Tcp {
                key: FlowKey {
                    src: SocketAddr::new(src, tcp.src_port()),
                    dst: SocketAddr::new(dst, tcp.dst_port()),
                },
                flags: TcpFlags {
                    syn: tcp.syn(),
                    ack: tcp.ack(),
                    rst: tcp.rst(),
                },
                seq: tcp.seq_number(),
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(payload) else {
                return Ingress::Drop(DropReason::BadUdp);
            };
            let mut caps = ChecksumCapabilities::default();
            if !verify {
                caps.udp = Checksum::None;
            }
            // Port 0 either way cannot be answered (`parse` refuses a destination port 0).
            if udp.src_port() == 0 || UdpRepr::parse(&udp, &src.into(), &dst.into(), &caps).is_err()
            {
                return Ingress::Drop(DropReason::BadUdp);
            }
            Ingress::Udp {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                start: at + UDP_HEADER,
                len: usize::from(udp.len()) - UDP_HEADER,
            }
        }
        IpProtocol::Icmp | IpProtocol::Icmpv6 => match echo(payload) {
            Echo::Request(ident, seq) => Ingress::Echo {
                src,
                dst,
                ident,
                seq,
                start: at,
                len: payload.len(),
            },
            Echo::Bad => Ingress::Reject(Unreachable::Prohibited),
            Echo::Not => Ingress::Drop(DropReason::Icmp),
        },
        _ => Ingress::Reject(Unreachable::Prohibited),
    }
}

/// Builds the ICMP destination-unreachable reply to `packet` (which [`classify`] rejected with
/// `kind`), sourced from the address the app tried to reach. Returns `None` if `packet` does
/// not parse (it always does when `classify` returned `Reject`).
pub fn unreachable_reply(packet: &[u8], kind: Unreachable) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let orig = Ipv4Repr::parse(&ip, &caps).ok()?;
            let payload = ip.payload();
            // RFC 792: the original header plus the first 8 bytes of its payload.
            let data = &payload[..payload.len().min(8)];
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: match kind {
                    Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
                    Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
                },
                header: orig,
                data,
            };
            let reply = Ipv4Repr {
                src_addr: orig.dst_addr,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; reply.buffer_len() + icmp.buffer_len()];
            let mut out = Ipv4Packet::new_unchecked(&mut buf[..]);
            reply.emit(&mut out, &caps);
            icmp.emit(&mut Icmpv4Packet::new_unchecked(out.payload_mut()), &caps);
            Some(buf)
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let orig = Ipv6Repr::parse(&ip).ok()?;
            let payload = ip.payload();
            // RFC 4443: as much of the invoking packet as fits in the minimum MTU.
            let room = 1280 - 40 - 8 - 40;
            let data = &payload[..payload.len().min(room)];
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: match kind {
                    Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
                    Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                },
                header: orig,
                data,
            };
            let reply = Ipv6Repr {
                src_addr: orig.dst_addr,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; reply.buffer_len() + icmp.buffer_len()];
            let mut out = Ipv6Packet::new_unchecked(&mut buf[..]);
            reply.emit(&mut out);
            icmp.emit(
                &orig.dst_addr,
                &orig.src_addr,
                &mut Icmpv6Packet::new_unchecked(out.payload_mut()),
                &caps,
            );
            Some(buf)
        }
        _ => None,
    }
}

/// The IP addresses and the TCP bytes of a well-formed IPv4/IPv6 packet (no checks beyond
/// lengths: used on packets that [`classify`] accepted or that smoltcp built).
fn ip_tcp(packet: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let tcp = ip.payload();
            (ip.next_header() == IpProtocol::Tcp)
                .then(|| (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), tcp))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let tcp = ip.payload();
            (ip.next_header() == IpProtocol::Tcp)
                .then(|| (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), tcp))
        }
        _ => None,
    }
}

/// Builds an IPv4/IPv6 packet around `tcp` (checksums computed); `None` if the two
/// addresses are of different families.
pub(crate) fn emit_tcp(src: IpAddr, dst: IpAddr, tcp: &TcpRepr) -> Option<Vec<u8>> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let caps = ChecksumCapabilities::default();
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    let ip = IpRepr::new(s, d, IpProtocol::Tcp, tcp.buffer_len(), 64);
    let mut buf = vec![0u8; ip.buffer_len()];
    ip.emit(&mut buf[..], &caps);
    let header = ip.header_len();
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[header..]),
        &s,
        &d,
        &caps,
    );
    Some(buf)
}

/// Builds an IPv4/IPv6 UDP datagram from `src` to `dst` carrying `payload` (checksums
/// computed): a reply on the direct path, written into the TUN from the address the app sent
/// to. `None` if the families differ or the packet would not fit in `mtu`.
pub fn emit_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8], mtu: usize) -> Option<Vec<u8>> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let caps = ChecksumCapabilities::default();
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = IpRepr::new(s, d, IpProtocol::Udp, UDP_HEADER + payload.len(), 64);
    // Both IP versions carry the length in 16 bits.
    if ip.buffer_len() > mtu.min(usize::from(u16::MAX)) {
        return None;
    }
    let mut buf = vec![0u8; ip.buffer_len()];
    ip.emit(&mut buf[..], &caps);
    let header = ip.header_len();
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[header..]),
        &s,
        &d,
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

/// The ICMP port unreachable for a datagram from the app at `src` to `dst` that is not
/// carried (UDP to the VPC, or refused by its destination), as [`unreachable_reply`] builds
/// it. The datagram it quotes is rebuilt from its addresses and ports (the original is gone
/// by the time the relay decides): that is all a kernel reads of the quote to find the app's
/// socket and give it `ECONNREFUSED`.
pub fn port_unreachable(src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    let datagram = emit_udp(src, dst, &[], usize::MAX)?;
    unreachable_reply(&datagram, Unreachable::Port)
}

/// Builds an ICMP (IPv4) or ICMPv6 echo request or reply from `src` to `dst` (checksums
/// computed); `None` if the families differ or it would not fit in `mtu`.
pub fn emit_echo(
    (src, dst): (IpAddr, IpAddr),
    request: bool,
    (ident, seq_no): (u16, u16),
    data: &[u8],
    mtu: usize,
) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    // Both IP versions carry the length in 16 bits.
    let room = mtu.min(usize::from(u16::MAX));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let icmp = if request {
                Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }
            } else {
                Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                }
            };
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            if ip.buffer_len() + icmp.buffer_len() > room {
                return None;
            }
            let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
            let mut out = Ipv4Packet::new_unchecked(&mut buf[..]);
            ip.emit(&mut out, &caps);
            icmp.emit(&mut Icmpv4Packet::new_unchecked(out.payload_mut()), &caps);
            Some(buf)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let icmp = if request {
                Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }
            } else {
                Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                }
            };
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            if ip.buffer_len() + icmp.buffer_len() > room {
                return None;
            }
            let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
            let mut out = Ipv6Packet::new_unchecked(&mut buf[..]);
            ip.emit(&mut out);
            let icmp_out = &mut Icmpv6Packet::new_unchecked(out.payload_mut());
            icmp.emit(&s, &d, icmp_out, &caps);
            Some(buf)
        }
        _ => None,
    }
}

/// The echo reply for the app's ping socket `ident` at `to`, from `from` (the address it
/// pinged), out of `message`: the reply a host ICMP socket received (whose identifier is the
/// host socket's own). `None` if `message` is not an echo reply of `from`'s family, or the
/// packet would not fit in `mtu`.
pub fn echo_reply(
    (from, to): (IpAddr, IpAddr),
    ident: u16,
    message: &[u8],
    mtu: usize,
) -> Option<Vec<u8>> {
    let (seq, data) = match from {
        IpAddr::V4(_) => {
            let p = Icmpv4Packet::new_checked(message).ok()?;
            let reply = p.msg_type() == Icmpv4Message::EchoReply;
            reply.then(|| (p.echo_seq_no(), p.data()))?
        }
        IpAddr::V6(_) => {
            let p = Icmpv6Packet::new_checked(message).ok()?;
            let reply = u8::from(p.msg_type()) == ECHO_REPLY_V6;
            reply.then(|| (p.echo_seq_no(), p.payload()))?
        }
    };
    emit_echo((from, to), false, (ident, seq), data, mtu)
}

/// The ICMP "administratively prohibited" for the app's echo request from `src` to `dst`
/// that is not carried (to the VPC, or no ICMP socket could be had), quoting the request
/// rebuilt from its addresses, identifier and sequence number (as [`port_unreachable`]).
pub fn echo_prohibited(src: IpAddr, dst: IpAddr, ident: u16, seq: u16) -> Option<Vec<u8>> {
    let request = emit_echo((src, dst), true, (ident, seq), &[], usize::MAX)?;
    unreachable_reply(&request, Unreachable::Prohibited)
}

/// The SYN `packet` (accepted by [`classify`]) rebuilt without its payload: a held SYN costs
/// its header only, whatever data (raw or TCP Fast Open) it carried. The data is not lost:
/// the SYN-ACK acknowledges only the SYN, so the app retransmits it. Options smoltcp does not
/// use (a Fast Open cookie among them) are dropped too.
pub fn syn_header(packet: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, tcp) = ip_tcp(packet)?;
    let tcp = TcpPacket::new_checked(tcp).ok()?;
    let caps = ChecksumCapabilities::ignored();
    let mut repr = TcpRepr::parse(&tcp, &src.into(), &dst.into(), &caps).ok()?;
    repr.payload = &[];
    emit_tcp(src, dst, &repr)
}

/// The sequence number of a TCP packet (one [`classify`] accepted).
pub fn tcp_seq(packet: &[u8]) -> Option<TcpSeqNumber> {
    let (_, _, tcp) = ip_tcp(packet)?;
    Some(TcpPacket::new_checked(tcp).ok()?.seq_number())
}

/// A segment without options or payload from `ends.0` to `ends.1` (the tests' app).
#[cfg(test)]
pub(crate) fn bare_segment(
    ends: (std::net::SocketAddr, std::net::SocketAddr),
    control: smoltcp::wire::TcpControl,
    seq: TcpSeqNumber,
    ack: Option<TcpSeqNumber>,
    window: u16,
) -> Option<Vec<u8>> {
    let tcp = TcpRepr {
        src_port: ends.0.port(),
        dst_port: ends.1.port(),
        control,
        seq_number: seq,
        ack_number: ack,
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    emit_tcp(ends.0.ip(), ends.1.ip(), &tcp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpControl, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr};
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const APP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const VPC_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    pub const APP_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x7365, 0, 0, 0, 0, 0, 1);
    pub const VPC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 10);

    /// An IPv4 TCP segment built with smoltcp's emitters.
    pub fn tcp_v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), control: TcpControl) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let tcp = TcpRepr {
            src_port: src.1,
            dst_port: dst.1,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 64240,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: src.0,
            dst_addr: dst.0,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src.0),
            &IpAddress::Ipv4(dst.0),
            &caps,
        );
        buf
    }

    pub fn udp_v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let udp = UdpRepr {
            src_port: src.1,
            dst_port: dst.1,
        };
        let ip = Ipv4Repr {
            src_addr: src.0,
            dst_addr: dst.0,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + udp.header_len() + payload.len()];
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p, &caps);
        udp.emit(
            &mut UdpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src.0),
            &IpAddress::Ipv4(dst.0),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    pub fn udp_v6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let udp = UdpRepr {
            src_port: src.1,
            dst_port: dst.1,
        };
        let ip = Ipv6Repr {
            src_addr: src.0,
            dst_addr: dst.0,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + udp.header_len() + payload.len()];
        let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p);
        udp.emit(
            &mut UdpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv6(src.0),
            &IpAddress::Ipv6(dst.0),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    #[test]
    fn syn_is_a_connect_of_its_flow() {
        let syn = tcp_v4((APP_V4, 40000), (VPC_V4, 80), TcpControl::Syn);
        match classify(&syn) {
            Ingress::Tcp { key, flags, .. } => {
                assert_eq!(key.src, SocketAddr::new(APP_V4.into(), 40000));
                assert_eq!(key.dst, SocketAddr::new(VPC_V4.into(), 80));
                assert!(flags.is_connect());
            }
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    #[test]
    fn corrupted_tcp_checksum_is_dropped() {
        let mut syn = tcp_v4((APP_V4, 40000), (VPC_V4, 80), TcpControl::Syn);
        let last = syn.len() - 1;
        syn[last] ^= 0xff;
        assert_eq!(classify(&syn), Ingress::Drop(DropReason::BadTcp));
    }

    /// The payload of a datagram [`classify`] accepted.
    fn udp_payload(dgram: &[u8]) -> (SocketAddr, SocketAddr, &[u8]) {
        match classify(dgram) {
            Ingress::Udp {
                src,
                dst,
                start,
                len,
            } => (src, dst, &dgram[start..start + len]),
            other => panic!("expected UDP, got {other:?}"),
        }
    }

    #[test]
    fn udp_v4_gets_port_unreachable_from_the_destination() {
        let dgram = udp_v4((APP_V4, 5353), (VPC_V4, 53), b"query");
        assert_eq!(
            udp_payload(&dgram),
            (
                SocketAddr::from((APP_V4, 5353)),
                SocketAddr::from((VPC_V4, 53)),
                &b"query"[..]
            )
        );
        let reply = unreachable_reply(&dgram, Unreachable::Port).expect("reply");
        let caps = ChecksumCapabilities::default();
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        assert_eq!((repr.src_addr, repr.dst_addr), (VPC_V4, APP_V4));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 3, "port unreachable");
        // The quoted packet: the original IPv4 header and the first 8 bytes (UDP header).
        let quoted = icmp.data();
        assert_eq!(quoted.len(), 20 + 8);
        assert_eq!(&quoted[..20], &dgram[..20]);
        assert_eq!(&quoted[20..28], &dgram[20..28]);
    }

    #[test]
    fn udp_v6_gets_port_unreachable() {
        let dgram = udp_v6((APP_V6, 5353), (VPC_V6, 53), b"q");
        assert_eq!(udp_payload(&dgram).2, b"q");
        let reply = unreachable_reply(&dgram, Unreachable::Port).expect("reply");
        let ip = Ipv6Packet::new_checked(&reply[..]).unwrap();
        let repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!((repr.src_addr, repr.dst_addr), (VPC_V6, APP_V6));
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let parsed = Icmpv6Repr::parse(
            &repr.src_addr,
            &repr.dst_addr,
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert!(matches!(
            parsed,
            Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::PortUnreachable,
                ..
            }
        ));
    }

    #[test]
    fn a_bad_udp_checksum_or_port_0_is_dropped_unless_offloaded() {
        let mut dgram = udp_v4((APP_V4, 5353), (VPC_V4, 53), b"query");
        let last = dgram.len() - 1;
        dgram[last] ^= 0xff;
        assert_eq!(classify(&dgram), Ingress::Drop(DropReason::BadUdp));
        assert!(
            matches!(classify_with(&dgram, false), Ingress::Udp { len: 5, .. }),
            "with checksum offload the kernel may not have computed it"
        );
        let from_port_0 = udp_v4((APP_V4, 0), (VPC_V4, 53), b"q");
        assert_eq!(classify(&from_port_0), Ingress::Drop(DropReason::BadUdp));
        let to_port_0 = udp_v4((APP_V4, 5353), (VPC_V4, 0), b"q");
        assert_eq!(classify(&to_port_0), Ingress::Drop(DropReason::BadUdp));
        // A length field beyond the packet.
        let mut long = udp_v4((APP_V4, 5353), (VPC_V4, 53), b"query");
        long[24..26].copy_from_slice(&200u16.to_be_bytes());
        assert!(matches!(classify(&long), Ingress::Drop(_)));
    }

    #[test]
    fn a_reply_is_a_udp_datagram_from_where_the_app_sent_and_parses_back() {
        let (app, dst) = (
            SocketAddr::from((APP_V4, 40_000)),
            SocketAddr::from(([93, 184, 216, 34], 443)),
        );
        let reply = emit_udp(dst, app, b"answer", 1500).expect("fits");
        assert_eq!(udp_payload(&reply), (dst, app, &b"answer"[..]));
        let (app6, dst6) = (
            SocketAddr::from((APP_V6, 40_000)),
            SocketAddr::from((VPC_V6, 53)),
        );
        let reply6 = emit_udp(dst6, app6, b"six", 1500).expect("fits");
        assert_eq!(udp_payload(&reply6), (dst6, app6, &b"six"[..]));
        assert_eq!(emit_udp(dst, app6, b"x", 1500), None, "mixed families");
        assert_eq!(emit_udp(dst, app, &[0; 1473], 1500), None, "over the MTU");
        assert!(
            emit_udp(dst, app, &[0; 1472], 1500).is_some(),
            "exactly the MTU"
        );
        assert_eq!(
            emit_udp(dst, app, &[0; 65_508], usize::MAX),
            None,
            "over 64 KiB"
        );
    }

    #[test]
    fn a_rebuilt_port_unreachable_quotes_the_apps_addresses_and_ports() {
        let (app, dst) = (
            SocketAddr::from((APP_V4, 40_000)),
            SocketAddr::from((VPC_V4, 53)),
        );
        let reply = port_unreachable(app, dst).expect("built");
        let caps = ChecksumCapabilities::default();
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        assert_eq!((repr.src_addr, repr.dst_addr), (VPC_V4, APP_V4));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_code(), 3, "port unreachable");
        let quoted = Ipv4Packet::new_checked(icmp.data()).unwrap();
        assert_eq!((quoted.src_addr(), quoted.dst_addr()), (APP_V4, VPC_V4));
        let udp = UdpPacket::new_checked(&icmp.data()[20..]).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (40_000, 53));
    }

    fn echo_of(packet: &[u8]) -> (IpAddr, IpAddr, u16, u16, &[u8]) {
        match classify(packet) {
            Ingress::Echo {
                src,
                dst,
                ident,
                seq,
                start,
                len,
            } => (src, dst, ident, seq, &packet[start..start + len]),
            other => panic!("expected an echo request, got {other:?}"),
        }
    }

    #[test]
    fn a_ping_is_an_echo_request_with_its_message_and_a_malformed_one_is_prohibited() {
        let (app, dst) = (IpAddr::V4(APP_V4), IpAddr::from([192, 0, 2, 1]));
        let ping = emit_echo((app, dst), true, (0x77, 3), b"abcdefgh", 1500).unwrap();
        let (src, to, ident, seq, message) = echo_of(&ping);
        assert_eq!((src, to, ident, seq), (app, dst, 0x77, 3));
        assert_eq!(
            message.len(),
            8 + 8,
            "header and data: what an ICMP socket sends"
        );
        assert_eq!((message[0], &message[8..]), (8, &b"abcdefgh"[..]));
        let mut bad = ping.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(classify(&bad), Ingress::Reject(Unreachable::Prohibited));
        // An echo reply from the app is not a request: dropped as before.
        let reply = emit_echo((app, dst), false, (0x77, 3), b"x", 1500).unwrap();
        assert_eq!(classify(&reply), Ingress::Drop(DropReason::Icmp));

        let (app6, dst6) = (IpAddr::V6(APP_V6), IpAddr::V6(VPC_V6));
        let ping6 = emit_echo((app6, dst6), true, (9, 1), b"six", 1500).unwrap();
        let (src, to, ident, seq, message) = echo_of(&ping6);
        assert_eq!((src, to, ident, seq), (app6, dst6, 9, 1));
        assert_eq!((message[0], &message[8..]), (128, &b"six"[..]));
    }

    #[test]
    fn an_echo_reply_goes_back_with_the_apps_identifier_and_the_hosts_sequence_and_data() {
        let (app, dst) = (IpAddr::V4(APP_V4), IpAddr::from([192, 0, 2, 1]));
        // What a host ICMP socket receives: the reply to its own identifier (0x4242).
        let host = emit_echo((dst, app), false, (0x4242, 5), b"payload", 1500).unwrap();
        let message = &host[20..];
        let reply = echo_reply((dst, app), 0x77, message, 1500).expect("a reply");
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            (Ipv4Addr::new(192, 0, 2, 1), APP_V4)
        );
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
        assert_eq!((icmp.echo_ident(), icmp.echo_seq_no()), (0x77, 5));
        assert_eq!(icmp.data(), b"payload");
        // Not an echo reply (a request, garbage): nothing.
        let request = emit_echo((dst, app), true, (1, 1), b"", 1500).unwrap();
        assert_eq!(echo_reply((dst, app), 0x77, &request[20..], 1500), None);
        assert_eq!(echo_reply((dst, app), 0x77, &[0, 0, 0], 1500), None);

        let (app6, dst6) = (IpAddr::V6(APP_V6), IpAddr::V6(VPC_V6));
        let host6 = emit_echo((dst6, app6), false, (0x4242, 6), b"v6", 1500).unwrap();
        let reply6 = echo_reply((dst6, app6), 9, &host6[40..], 1500).expect("a reply");
        let ip6 = Ipv6Packet::new_checked(&reply6[..]).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip6.src_addr(),
            &ip6.dst_addr(),
            &Icmpv6Packet::new_checked(ip6.payload()).unwrap(),
            &ChecksumCapabilities::default(),
        )
        .expect("a valid ICMPv6 message");
        assert_eq!(
            repr,
            Icmpv6Repr::EchoReply {
                ident: 9,
                seq_no: 6,
                data: b"v6"
            }
        );
    }

    #[test]
    fn a_ping_not_carried_is_prohibited_quoting_its_identifier() {
        let (app, dst) = (IpAddr::V4(APP_V4), IpAddr::V4(VPC_V4));
        let reply = echo_prohibited(app, dst, 0x77, 3).expect("built");
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (VPC_V4, APP_V4));
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code()),
            (Icmpv4Message::DstUnreachable, 13)
        );
        let quoted = &icmp.data()[20..];
        assert_eq!(quoted[0], 8, "the echo request");
        assert_eq!(u16::from_be_bytes([quoted[4], quoted[5]]), 0x77);
        assert_eq!(u16::from_be_bytes([quoted[6], quoted[7]]), 3);
    }

    #[test]
    fn multicast_and_garbage_are_dropped_silently() {
        let mcast = udp_v4((APP_V4, 5353), (Ipv4Addr::new(224, 0, 0, 251), 5353), b"m");
        assert_eq!(classify(&mcast), Ingress::Drop(DropReason::NotUnicast));
        assert_eq!(classify(&[]), Ingress::Drop(DropReason::Malformed));
        assert_eq!(
            classify(&[0x45, 0, 0]),
            Ingress::Drop(DropReason::Malformed)
        );
        assert_eq!(classify(&[0x60; 10]), Ingress::Drop(DropReason::Malformed));
    }

    #[test]
    fn seeded_mutations_never_panic() {
        let seeds = [
            tcp_v4((APP_V4, 40000), (VPC_V4, 80), TcpControl::Syn),
            udp_v4((APP_V4, 5353), (VPC_V4, 53), b"query"),
            udp_v6((APP_V6, 5353), (VPC_V6, 53), b"query"),
            emit_echo((APP_V4.into(), VPC_V4.into()), true, (7, 1), b"ping", 1500).unwrap(),
            emit_echo((APP_V6.into(), VPC_V6.into()), true, (7, 1), b"ping", 1500).unwrap(),
        ];
        // xorshift64*, fixed seed: deterministic.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..20_000 {
            let mut p = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % p.len();
                p[i] = next() as u8;
            }
            p.truncate((next() as usize) % (p.len() + 1));
            match classify(&p) {
                Ingress::Reject(kind) => {
                    let _ = unreachable_reply(&p, kind);
                }
                Ingress::Udp {
                    src,
                    dst,
                    start,
                    len,
                } => {
                    let payload = &p[start..start + len];
                    assert!(emit_udp(dst, src, payload, 65_535).is_some());
                    assert!(port_unreachable(src, dst).is_some());
                }
                Ingress::Echo {
                    src,
                    dst,
                    ident,
                    seq,
                    start,
                    len,
                } => {
                    let _ = echo_reply((dst, src), ident, &p[start..start + len], 65_535);
                    assert!(echo_prohibited(src, dst, ident, seq).is_some());
                }
                _ => {}
            }
        }
    }
}
