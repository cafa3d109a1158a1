//! A minimal, read-only ZooKeeper client: the session handshake, `getChildren` and
//! `getData` (jute encoding, length-prefixed frames), enough to list the providers a registry
//! holds. The codec is pure and tested with byte vectors; [`records`] is the one function
//! that does I/O. It never creates, changes or watches a node.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Family, Record, RegistryError, parse_dubbo_url, percent_decode};

/// `getData`.
const OP_GET_DATA: i32 = 4;
/// `getChildren`.
const OP_GET_CHILDREN: i32 = 8;
/// `closeSession`.
const OP_CLOSE: i32 = -11;
/// The error code of a node that does not exist.
const NO_NODE: i32 = -101;
/// The largest frame accepted (ZooKeeper's own default `jute.maxbuffer` is 1 MiB; nodes here
/// are small).
const MAX_FRAME: usize = 4 << 20;
/// The most nodes read in one scan of a registry.
const MAX_NODES: usize = 5000;

/// The session handshake (`ConnectRequest`), framed: protocol 0, no previous session, a
/// 10 s session timeout, an empty password, not read-only.
pub fn connect_request() -> Vec<u8> {
    let mut body = Vec::with_capacity(44);
    body.extend_from_slice(&0i32.to_be_bytes()); // protocolVersion
    body.extend_from_slice(&0i64.to_be_bytes()); // lastZxidSeen
    body.extend_from_slice(&10_000i32.to_be_bytes()); // timeOut (ms)
    body.extend_from_slice(&0i64.to_be_bytes()); // sessionId
    body.extend_from_slice(&16i32.to_be_bytes()); // passwd: 16 zero bytes
    body.extend_from_slice(&[0u8; 16]);
    body.push(0); // readOnly
    frame(&body)
}

/// A request with a path and `watch = false` (`getChildren`, `getData`), framed.
pub fn request(xid: i32, op: i32, path: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(13 + path.len());
    body.extend_from_slice(&xid.to_be_bytes());
    body.extend_from_slice(&op.to_be_bytes());
    body.extend_from_slice(&(path.len() as i32).to_be_bytes());
    body.extend_from_slice(path.as_bytes());
    body.push(0); // watch
    frame(&body)
}

/// `closeSession`, framed.
pub fn close_request(xid: i32) -> Vec<u8> {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&xid.to_be_bytes());
    body.extend_from_slice(&OP_CLOSE.to_be_bytes());
    frame(&body)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A bounds-checked reader over a frame.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RegistryError> {
        if self.buf.len() < n {
            return Err(RegistryError::Malformed("a ZooKeeper frame ends early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn i32(&mut self) -> Result<i32, RegistryError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Result<i64, RegistryError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    /// A jute buffer or string: `None` for length -1.
    fn buffer(&mut self) -> Result<Option<&'a [u8]>, RegistryError> {
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(RegistryError::Malformed("a negative ZooKeeper length")),
            n => self.take(n as usize).map(Some),
        }
    }
}

/// Checks the handshake's answer: a session with a positive timeout.
pub fn parse_connect_response(frame: &[u8]) -> Result<(), RegistryError> {
    let mut c = Cursor { buf: frame };
    let _protocol = c.i32()?;
    let timeout = c.i32()?;
    let _session = c.i64()?;
    let _passwd = c.buffer()?;
    if timeout <= 0 {
        return Err(RegistryError::Malformed("ZooKeeper refused the session"));
    }
    Ok(())
}

/// A reply's header: (xid, error code) and its body.
pub fn parse_reply(frame: &[u8]) -> Result<(i32, i32, &[u8]), RegistryError> {
    let mut c = Cursor { buf: frame };
    let xid = c.i32()?;
    let _zxid = c.i64()?;
    let err = c.i32()?;
    Ok((xid, err, c.buf))
}

/// A `getChildren` reply's body: the child names.
pub fn parse_children(body: &[u8]) -> Result<Vec<String>, RegistryError> {
    let mut c = Cursor { buf: body };
    let n = c.i32()?;
    if n < 0 {
        return Ok(Vec::new());
    }
    // Each name takes at least its 4-byte length: a count beyond that is a lie.
    if n as usize > body.len() / 4 {
        return Err(RegistryError::Malformed(
            "a ZooKeeper list longer than its frame",
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = c.buffer()?.unwrap_or_default();
        out.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(out)
}

/// A `getData` reply's body: the node's data (the `Stat` after it is not needed).
pub fn parse_data(body: &[u8]) -> Result<Option<Vec<u8>>, RegistryError> {
    let mut c = Cursor { buf: body };
    Ok(c.buffer()?.map(<[u8]>::to_vec))
}

/// One connection with a session.
struct Client {
    stream: TcpStream,
    xid: i32,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Client, RegistryError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| RegistryError::Connect { addr, source })?;
        stream.write_all(&connect_request()).await?;
        let answer = read_frame(&mut stream).await?;
        parse_connect_response(&answer)?;
        Ok(Client { stream, xid: 0 })
    }

    /// Sends `op` on `path` and returns (error code, body) of its reply (notifications and
    /// pings in between are skipped).
    async fn call(&mut self, op: i32, path: &str) -> Result<(i32, Vec<u8>), RegistryError> {
        self.xid += 1;
        self.stream.write_all(&request(self.xid, op, path)).await?;
        loop {
            let f = read_frame(&mut self.stream).await?;
            let (xid, err, body) = parse_reply(&f)?;
            if xid == self.xid {
                return Ok((err, body.to_vec()));
            }
        }
    }

    async fn children(&mut self, path: &str) -> Result<Vec<String>, RegistryError> {
        match self.call(OP_GET_CHILDREN, path).await? {
            (0, body) => parse_children(&body),
            (NO_NODE, _) => Ok(Vec::new()),
            (err, _) => Err(RegistryError::Zookeeper(err)),
        }
    }

    async fn data(&mut self, path: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self.call(OP_GET_DATA, path).await? {
            (0, body) => parse_data(&body),
            (NO_NODE, _) => Ok(None),
            (err, _) => Err(RegistryError::Zookeeper(err)),
        }
    }

    async fn close(mut self) {
        self.xid += 1;
        let _ = self.stream.write_all(&close_request(self.xid)).await;
    }
}

async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, RegistryError> {
    let len = stream.read_i32().await?;
    if len < 0 || len as usize > MAX_FRAME {
        return Err(RegistryError::Malformed(
            "a ZooKeeper frame of an impossible size",
        ));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// A Curator service instance (`/services/APP/ID`, JSON) as a record: Spring Cloud
/// Zookeeper's and Dubbo 3's application-level registrations.
pub fn service_instance(app: &str, json: &[u8]) -> Option<Record> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let host = v.get("address")?.as_str()?.to_owned();
    let port = u16::try_from(v.get("port")?.as_u64()?).ok()?;
    let params = super::string_map(v.pointer("/payload/metadata"));
    Some(Record {
        location: format!("/services/{app}"),
        family: Family::ServiceInstance,
        host,
        port,
        params,
    })
}

/// Every provider record under `/dubbo` (interface level) and `/services` (application
/// level), at most [`MAX_NODES`] nodes read.
pub async fn records(addr: SocketAddr) -> Result<Vec<Record>, RegistryError> {
    let mut zk = Client::connect(addr).await?;
    let mut out = Vec::new();
    let mut budget = MAX_NODES;
    for service in zk.children("/dubbo").await? {
        if budget == 0 {
            break;
        }
        let path = format!("/dubbo/{service}/providers");
        for node in zk.children(&path).await? {
            budget = budget.saturating_sub(1);
            if let Some((host, port, params)) = parse_dubbo_url(&percent_decode(&node)) {
                out.push(Record {
                    location: path.clone(),
                    family: Family::DubboProvider,
                    host,
                    port,
                    params,
                });
            }
        }
    }
    for app in zk.children("/services").await? {
        for id in zk.children(&format!("/services/{app}")).await? {
            if budget == 0 {
                break;
            }
            budget -= 1;
            if let Some(data) = zk.data(&format!("/services/{app}/{id}")).await?
                && let Some(r) = service_instance(&app, &data)
            {
                out.push(r);
            }
        }
    }
    zk.close().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_jute() {
        let r = request(7, OP_GET_CHILDREN, "/dubbo");
        assert_eq!(
            r,
            [
                0, 0, 0, 19, // frame length
                0, 0, 0, 7, // xid
                0, 0, 0, 8, // getChildren
                0, 0, 0, 6, b'/', b'd', b'u', b'b', b'b', b'o', // path
                0,    // no watch
            ]
        );
        let c = connect_request();
        assert_eq!(&c[..4], &45i32.to_be_bytes());
        assert_eq!(c.len(), 49);
        assert_eq!(
            close_request(3),
            [0, 0, 0, 8, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xf5]
        );
    }

    fn reply(xid: i32, err: i32, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&xid.to_be_bytes());
        f.extend_from_slice(&99i64.to_be_bytes());
        f.extend_from_slice(&err.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn replies_decode_and_lies_are_refused() {
        let mut body = 2i32.to_be_bytes().to_vec();
        for name in ["a", "bc"] {
            body.extend_from_slice(&(name.len() as i32).to_be_bytes());
            body.extend_from_slice(name.as_bytes());
        }
        let f = reply(5, 0, &body);
        let (xid, err, b) = parse_reply(&f).unwrap();
        assert_eq!((xid, err), (5, 0));
        assert_eq!(parse_children(b).unwrap(), ["a", "bc"]);
        // A count far beyond the frame, a name past its end, a truncated header.
        let mut lie = 1_000_000i32.to_be_bytes().to_vec();
        lie.extend_from_slice(&[0, 0, 0, 1, b'x']);
        assert!(parse_children(&lie).is_err());
        assert!(parse_children(&[0, 0, 0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(parse_reply(&[0, 0, 0]).is_err());
        assert!(parse_children(&(-1i32).to_be_bytes()).unwrap().is_empty());
        // getData: a buffer, then a Stat we do not read; a null buffer.
        let mut data = 3i32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{}x");
        data.extend_from_slice(&[0u8; 68]);
        assert_eq!(parse_data(&data).unwrap().unwrap(), b"{}x");
        assert_eq!(parse_data(&(-1i32).to_be_bytes()).unwrap(), None);
        // The handshake: a zero timeout is a refusal.
        let mut ok = 0i32.to_be_bytes().to_vec();
        ok.extend_from_slice(&10_000i32.to_be_bytes());
        ok.extend_from_slice(&1i64.to_be_bytes());
        ok.extend_from_slice(&16i32.to_be_bytes());
        ok.extend_from_slice(&[0u8; 16]);
        assert!(parse_connect_response(&ok).is_ok());
        let mut refused = ok.clone();
        refused[4..8].copy_from_slice(&0i32.to_be_bytes());
        assert!(parse_connect_response(&refused).is_err());
    }

    #[test]
    fn curator_instances_become_records() {
        let json = br#"{"name":"greeter","id":"1b2","address":"10.0.0.1","port":18080,
            "sslPort":null,"payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
            "id":"greeter","name":"greeter","metadata":{"hint":"alice","instance_status":"UP"}},
            "registrationTimeUTC":1,"serviceType":"DYNAMIC","uriSpec":{"parts":[]}}"#;
        let r = service_instance("greeter", json).unwrap();
        assert_eq!(r.location, "/services/greeter");
        assert_eq!((r.host.as_str(), r.port), ("10.0.0.1", 18080));
        assert_eq!(r.tag(), Some("alice"));
        assert!(r.points_at("10.0.0.1:18080".parse().unwrap()));
        assert!(service_instance("x", b"not json").is_none());
        assert!(service_instance("x", br#"{"address":"h","port":70000}"#).is_none());
    }
}
