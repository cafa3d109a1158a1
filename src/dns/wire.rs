//! DNS wire format, sans-IO: the few things the responder needs from a message and nothing
//! more. It reads a query's header, its one question and its EDNS0 UDP size; it rewrites a
//! message's ID; it builds SERVFAIL / REFUSED answers and TC-truncated answers. It never
//! resolves, caches or builds records, and touches no socket and no clock.
//!
//! Untrusted bytes: every read is bounds-checked and every failure is a [`WireError`]; no
//! input can panic or loop (name compression pointers are followed a bounded number of times,
//! and only backwards).

use std::fmt;

/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// The UDP payload limit of a client that does not advertise EDNS0 (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// RR type of the EDNS0 OPT pseudo-record.
const TYPE_OPT: u16 = 41;
/// Longest name in wire form (RFC 1035).
const MAX_NAME_WIRE: usize = 255;
/// How many compression pointers a name may follow.
const MAX_POINTERS: usize = 16;
/// How many additional records a query may carry before it is refused.
const MAX_ADDITIONAL: usize = 8;

/// RCODE SERVFAIL.
pub const RCODE_SERVFAIL: u8 = 2;
/// RCODE REFUSED.
pub const RCODE_REFUSED: u8 = 5;

/// Why bytes are not a usable DNS query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the header or a field runs past the end.
    Truncated,
    /// The QR bit says this is a response, not a query.
    NotAQuery,
    /// Not exactly one question.
    QuestionCount,
    /// A name is malformed (label too long, bad pointer, too long overall).
    BadName,
    /// Too many records in the additional section.
    TooManyRecords,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "message truncated",
            WireError::NotAQuery => "message is a response",
            WireError::QuestionCount => "not exactly one question",
            WireError::BadName => "malformed name",
            WireError::TooManyRecords => "too many additional records",
        })
    }
}

impl std::error::Error for WireError {}

/// What the responder needs to know about a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The message ID.
    pub id: u16,
    /// The question's name, lowercase, dotted, without the trailing dot ("" for the root).
    pub name: String,
    /// The question's type (1 = A, 12 = PTR, 28 = AAAA, ...).
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
    /// Where the question section ends (header + question), for building answers.
    pub question_end: usize,
    /// The largest UDP answer the client accepts: its EDNS0 size, or 512.
    pub udp_limit: usize,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, WireError> {
    let hi = *b.get(at).ok_or(WireError::Truncated)?;
    let lo = *b.get(at + 1).ok_or(WireError::Truncated)?;
    Ok(u16::from_be_bytes([hi, lo]))
}

/// Reads the name at `at`; returns it (lowercase, dotted) and the offset after it.
fn read_name(b: &[u8], at: usize) -> Result<(String, usize), WireError> {
    let mut name = String::new();
    let mut pos = at;
    let mut end = None;
    let mut wire_len = 0usize;
    let mut pointers = 0;
    loop {
        let len = *b.get(pos).ok_or(WireError::Truncated)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => {
                wire_len += 1;
                if wire_len > MAX_NAME_WIRE {
                    return Err(WireError::BadName);
                }
                return Ok((name, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = b.get(pos + 1..pos + 1 + len).ok_or(WireError::Truncated)?;
                wire_len += 1 + len;
                if wire_len > MAX_NAME_WIRE {
                    return Err(WireError::BadName);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                for &c in label {
                    // Keep the name printable and unambiguous: escape what is not.
                    match c.to_ascii_lowercase() {
                        c @ (b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'*') => {
                            name.push(c as char)
                        }
                        c => name.push_str(&format!("\\{c:03}")),
                    }
                }
                pos += 1 + len;
            }
            0xc0 => {
                let target = (u16_at(b, pos)? & 0x3fff) as usize;
                pointers += 1;
                // Only backwards, a bounded number of times: no loops.
                if target >= pos || pointers > MAX_POINTERS {
                    return Err(WireError::BadName);
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return Err(WireError::BadName),
        }
    }
}

/// Skips one resource record at `at`; returns (type, class, offset after it).
fn skip_rr(b: &[u8], at: usize) -> Result<(u16, u16, usize), WireError> {
    let (_, pos) = read_name(b, at)?;
    let rtype = u16_at(b, pos)?;
    let class = u16_at(b, pos + 2)?;
    let rdlen = u16_at(b, pos + 8)? as usize;
    let end = pos + 10 + rdlen;
    if end > b.len() {
        return Err(WireError::Truncated);
    }
    Ok((rtype, class, end))
}

impl Query {
    /// Parses a query message.
    pub fn parse(b: &[u8]) -> Result<Query, WireError> {
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[2] & 0x80 != 0 {
            return Err(WireError::NotAQuery);
        }
        if u16_at(b, 4)? != 1 {
            return Err(WireError::QuestionCount);
        }
        let (an, ns, ar) = (u16_at(b, 6)?, u16_at(b, 8)?, u16_at(b, 10)?);
        let records = an as usize + ns as usize + ar as usize;
        if records > MAX_ADDITIONAL {
            return Err(WireError::TooManyRecords);
        }
        let (name, pos) = read_name(b, HEADER_LEN)?;
        let qtype = u16_at(b, pos)?;
        let qclass = u16_at(b, pos + 2)?;
        let question_end = pos + 4;
        let mut udp_limit = CLASSIC_UDP_LIMIT;
        let mut at = question_end;
        for _ in 0..records {
            let (rtype, class, next) = skip_rr(b, at)?;
            if rtype == TYPE_OPT {
                // The OPT record's class is the requestor's UDP payload size; below 512 it
                // means 512 (RFC 6891).
                udp_limit = (class as usize).max(CLASSIC_UDP_LIMIT);
            }
            at = next;
        }
        Ok(Query {
            id: u16_at(b, 0)?,
            name,
            qtype,
            qclass,
            question_end,
            udp_limit,
        })
    }
}

/// The ID of a message, if it has a header.
pub fn id(msg: &[u8]) -> Option<u16> {
    (msg.len() >= HEADER_LEN).then(|| u16::from_be_bytes([msg[0], msg[1]]))
}

/// Rewrites the ID of a message (no-op on a message shorter than the header).
pub fn set_id(msg: &mut [u8], id: u16) {
    if msg.len() >= HEADER_LEN {
        msg[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// True if `msg` is a response (QR set) with a header.
pub fn is_response(msg: &[u8]) -> bool {
    msg.len() >= HEADER_LEN && msg[2] & 0x80 != 0
}

/// An answer to `query` (whose bytes are `raw`) carrying only its question and `rcode`.
pub fn error_answer(raw: &[u8], query: &Query, rcode: u8) -> Vec<u8> {
    let mut out = raw[..query.question_end.min(raw.len())].to_vec();
    // QR=1, keep opcode and RD; RA=1; rcode.
    out[2] = 0x80 | (raw[2] & 0x79);
    out[3] = 0x80 | (rcode & 0x0f);
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..12].fill(0);
    out
}

/// Fits a response into `limit` bytes for UDP: returned unchanged if it fits, else reduced
/// to its header and question with TC set, so that the client retries over TCP.
pub fn truncate_for_udp(resp: Vec<u8>, limit: usize) -> Vec<u8> {
    if resp.len() <= limit || resp.len() < HEADER_LEN {
        return resp;
    }
    let question_end = u16_at(&resp, 4)
        .ok()
        .filter(|qd| *qd == 1)
        .and_then(|_| read_name(&resp, HEADER_LEN).ok())
        .map(|(_, pos)| pos + 4)
        .filter(|end| *end <= resp.len() && *end <= limit);
    let mut out = match question_end {
        Some(end) => resp[..end].to_vec(),
        None => {
            let mut h = resp[..HEADER_LEN].to_vec();
            h[4..6].fill(0);
            h
        }
    };
    out[2] |= 0x02; // TC
    out[6..12].fill(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a query for `name`/`qtype`, optionally with an EDNS0 OPT record of `edns` size.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        if let Some(size) = edns {
            b.push(0);
            b.extend_from_slice(&TYPE_OPT.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        b
    }

    #[test]
    fn a_query_parses_with_and_without_edns() {
        let q = Query::parse(&query(0x1234, "API.Internal", 1, None)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "api.internal");
        assert_eq!((q.qtype, q.qclass), (1, 1));
        assert_eq!(q.udp_limit, 512);
        assert_eq!(q.question_end, HEADER_LEN + 14 + 4);
        let q = Query::parse(&query(7, "db.rds.example.com", 28, Some(1232))).unwrap();
        assert_eq!(q.udp_limit, 1232);
        let q = Query::parse(&query(7, "x", 1, Some(100))).unwrap();
        assert_eq!(q.udp_limit, 512, "an EDNS size under 512 means 512");
        let q = Query::parse(&query(7, "", 2, None)).unwrap();
        assert_eq!(q.name, "", "the root");
    }

    #[test]
    fn odd_bytes_in_labels_are_escaped_not_confused_with_dots() {
        let mut b = query(1, "ab", 1, None);
        b[HEADER_LEN + 1] = b'.';
        assert_eq!(Query::parse(&b).unwrap().name, "\\046b");
    }

    #[test]
    fn hostile_queries_are_errors_not_panics() {
        assert_eq!(Query::parse(&[]), Err(WireError::Truncated));
        assert_eq!(Query::parse(&[0; 11]), Err(WireError::Truncated));
        let mut resp = query(1, "a.b", 1, None);
        resp[2] |= 0x80;
        assert_eq!(Query::parse(&resp), Err(WireError::NotAQuery));
        let mut two = query(1, "a.b", 1, None);
        two[5] = 2;
        assert_eq!(Query::parse(&two), Err(WireError::QuestionCount));
        // A label running past the end.
        let mut long = query(1, "abc", 1, None);
        long[HEADER_LEN] = 60;
        assert_eq!(Query::parse(&long), Err(WireError::Truncated));
        // A pointer to itself (a loop), and a forward pointer.
        let mut ptr = query(1, "abc", 1, None);
        ptr[HEADER_LEN] = 0xc0;
        ptr[HEADER_LEN + 1] = HEADER_LEN as u8;
        assert_eq!(Query::parse(&ptr), Err(WireError::BadName));
        ptr[HEADER_LEN + 1] = 40;
        assert_eq!(Query::parse(&ptr), Err(WireError::BadName));
        // Reserved label type.
        let mut res = query(1, "abc", 1, None);
        res[HEADER_LEN] = 0x40;
        assert_eq!(Query::parse(&res), Err(WireError::BadName));
        // A name longer than 255 bytes.
        let long_name = vec!["a".repeat(63); 5].join(".");
        assert_eq!(
            Query::parse(&query(1, &long_name, 1, None)),
            Err(WireError::BadName)
        );
        // An OPT record cut short.
        let mut cut = query(1, "a", 1, Some(4096));
        cut.truncate(cut.len() - 3);
        assert_eq!(Query::parse(&cut), Err(WireError::Truncated));
        // Too many records.
        let mut many = query(1, "a", 1, None);
        many[11] = 200;
        assert_eq!(Query::parse(&many), Err(WireError::TooManyRecords));
    }

    #[test]
    fn every_prefix_and_every_byte_flip_of_a_query_is_handled() {
        let base = query(0xbeef, "db.rds.example.com", 1, Some(1232));
        for n in 0..base.len() {
            let _ = Query::parse(&base[..n]);
            let _ = truncate_for_udp(base[..n].to_vec(), 20);
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut m = base.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % m.len() as u64) as usize;
                m[at] = (seed >> 32) as u8;
            }
            if let Ok(q) = Query::parse(&m) {
                assert!(q.question_end <= m.len());
                let e = error_answer(&m, &q, RCODE_SERVFAIL);
                assert!(is_response(&e));
            }
            let _ = truncate_for_udp(m, 30);
        }
    }

    #[test]
    fn ids_are_rewritten_in_place() {
        let mut m = query(0x0102, "a", 1, None);
        set_id(&mut m, 0xa0b0);
        assert_eq!(id(&m), Some(0xa0b0));
        assert_eq!(id(&m[..5]), None);
        set_id(&mut m[..5], 1); // too short: untouched, no panic
    }

    #[test]
    fn servfail_keeps_id_question_and_rd() {
        let raw = query(0x4242, "api.internal", 1, Some(1232));
        let q = Query::parse(&raw).unwrap();
        let a = error_answer(&raw, &q, RCODE_SERVFAIL);
        assert_eq!(a.len(), q.question_end);
        assert_eq!(id(&a), Some(0x4242));
        assert!(is_response(&a));
        assert_eq!(a[2] & 0x01, 0x01, "RD copied");
        assert_eq!(a[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(&a[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&a[HEADER_LEN..], &raw[HEADER_LEN..q.question_end]);
    }

    #[test]
    fn big_answers_are_truncated_with_tc_small_ones_pass() {
        let raw = query(9, "big.internal", 16, None);
        let q = Query::parse(&raw).unwrap();
        let mut resp = raw[..q.question_end].to_vec();
        resp[2] |= 0x80;
        resp[7] = 1; // one answer
        resp.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, 0x03, 0x00]);
        resp.extend(std::iter::repeat_n(b'x', 0x300));
        let small = truncate_for_udp(resp.clone(), 4096);
        assert_eq!(small, resp);
        let t = truncate_for_udp(resp, 512);
        assert_eq!(t.len(), q.question_end);
        assert_eq!(t[2] & 0x02, 0x02, "TC set");
        assert_eq!(&t[6..12], &[0; 6], "no records");
        assert_eq!(id(&t), Some(9));
    }
}
