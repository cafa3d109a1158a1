//! An in-process jump host: a russh server on 127.0.0.1 that stands in for OpenSSH's sshd.
//!
//! It accepts one user key (generated in-process), serves `direct-tcpip` by connecting to
//! the requested port on 127.0.0.1 (whatever host was asked for: the test's echo servers
//! play the VPC), answers `tcpip-forward` by recording the listener, and opens
//! `forwarded-tcpip` channels when the test says a cloud caller arrives ([`Jump::call`]).
//!
//! What the test can do to it: [`Jump::drop_connections`] shuts the TCP connections down
//! under both ends, as a network outage or a dead sshd would; [`Jump::set_down`] closes every
//! new connection before the SSH greeting (sshd not running); [`Jump::refuse`] resets the
//! next connections under the client's SSH banner (sshd's `MaxStartups` drop: it closes the
//! socket unread); [`Jump::silence`] leaves the channel opens to a port unanswered (a
//! destination that drops SYNs).
//!
//! What it does not do: listen on the forwarded ports for real, run commands (`exec` is
//! refused, like a jump host without a shell for us), or check the user name.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};

use mse_vpn::ssh::{JumpHost, SshOptions};

/// A fresh ed25519 key, from the test's own randomness.
pub fn ed25519() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// A `tcpip-forward` the client asked for.
#[derive(Clone)]
struct Forward {
    /// The connection that asked (its listener goes with it).
    conn: usize,
    /// The address it asked to bind.
    address: String,
    /// Where forwarded-tcpip channels for it are opened.
    handle: server::Handle,
}

/// What the server knows, shared by its connections and the test.
#[derive(Default)]
struct State {
    /// Each accepted TCP connection (a second handle on the socket, to shut it down).
    conns: Vec<Option<std::net::TcpStream>>,
    /// Listeners by port.
    forwards: HashMap<u16, Forward>,
    /// The next port handed out for `tcpip-forward` to port 0.
    next_port: u16,
    /// Every `direct-tcpip` asked for: (host, port).
    opens: Vec<(String, u16)>,
    /// Ports whose `direct-tcpip` opens are never answered (a destination that drops SYNs,
    /// while sshd's own connect waits).
    silent: Vec<u16>,
    /// The opens held unanswered (dropping one would refuse it).
    held: Vec<(Channel<Msg>, server::ChannelOpenHandle)>,
    /// Down: every TCP connection is closed at once, before the SSH greeting (an sshd that
    /// is not running behind a port that still answers).
    down: bool,
    /// How many of the next TCP connections are reset once the client's banner arrived,
    /// unread (as sshd drops a connection beyond `MaxStartups`).
    refuse: usize,
    /// When each TCP connection arrived, logins or not (on tokio's clock).
    attempts: Vec<tokio::time::Instant>,
    /// Connections accepted and not yet logged in (what sshd's `MaxStartups` counts).
    pending: usize,
    /// The most there ever were at once.
    max_pending: usize,
    /// The server configuration new connections get (its host key).
    config: Option<Arc<server::Config>>,
}

/// The in-process jump host. Dropping it stops accepting (connections already made go on
/// until [`Jump::drop_connections`] or the client leaves).
pub struct Jump {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The test user's key file (OpenSSH format, mode 0600) and known_hosts, in `dir`.
    pub key_file: PathBuf,
    known_hosts: PathBuf,
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Jump {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Jump {
    /// Starts a jump host on a free port of 127.0.0.1.
    pub async fn start() -> Jump {
        let dir = std::env::temp_dir().join(format!(
            "mse-vpn-inproc-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let user_key = ed25519();
        let key_file = dir.join("id_ed25519");
        write_private(&key_file, &user_key);
        let host_key = ed25519();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        // The client knows the host key beforehand, as after a first `--accept-new-host-key`.
        let known_hosts = dir.join("known_hosts");
        russh::keys::known_hosts::learn_known_hosts_path(
            &addr.ip().to_string(),
            addr.port(),
            host_key.public_key(),
            &known_hosts,
        )
        .expect("write known_hosts");

        let state = Arc::new(Mutex::new(State {
            next_port: 20_000,
            config: Some(server_config(host_key)),
            ..State::default()
        }));
        let accept = tokio::spawn(accept_loop(
            listener,
            user_key.public_key().clone(),
            state.clone(),
        ));
        Jump {
            addr,
            key_file,
            known_hosts,
            dir,
            state,
            accept,
        }
    }

    /// Options that log in to this jump host with the test key, with short timeouts.
    pub fn options(&self) -> SshOptions {
        SshOptions {
            jump: JumpHost {
                user: Some("tester".into()),
                host: self.addr.ip().to_string(),
                port: self.addr.port(),
                port_given: true,
            },
            user: "tester".into(),
            identity_files: vec![self.key_file.clone()],
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: false,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_max: 3,
            window_size: 2 * 1024 * 1024,
            agent_socket: None,
            identities_only: false,
            proxy_command: None,
            file_owner: None,
            // This jump host is not OpenSSH (nothing to switch on), and on a virtual clock the
            // command's round trips would let time jump ahead in the pool tests.
            bulk_mode: false,
            inbound: None,
            budget: None,
            hops: Vec::new(),
            password_file: None,
        }
    }

    /// The client's known_hosts file (holding the jump host's first key).
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    /// New connections get a new host key (a reinstalled jump host, or an impostor).
    pub fn change_host_key(&self) {
        self.state.lock().unwrap().config = Some(server_config(ed25519()));
    }

    /// Goes down (every new connection is closed at once) or comes back.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// Resets the next `n` connections under the client's banner (`usize::MAX`: all of
    /// them, until called again).
    pub fn refuse(&self, n: usize) {
        self.state.lock().unwrap().refuse = n;
    }

    /// When each TCP connection arrived so far, refused ones included.
    pub fn attempts(&self) -> Vec<tokio::time::Instant> {
        self.state.lock().unwrap().attempts.clone()
    }

    /// The most connections that were ever accepted and not yet logged in at once.
    pub fn max_pending(&self) -> usize {
        self.state.lock().unwrap().max_pending
    }

    /// TCP connections accepted so far (each login of the pool, each reconnect).
    pub fn accepted(&self) -> usize {
        self.state.lock().unwrap().conns.len()
    }

    /// `direct-tcpip` opens to `port` are left unanswered from now on.
    pub fn silence(&self, port: u16) {
        self.state.lock().unwrap().silent.push(port);
    }

    /// Every `direct-tcpip` destination asked for so far.
    pub fn opens(&self) -> Vec<(String, u16)> {
        self.state.lock().unwrap().opens.clone()
    }

    /// Shuts down every connection's TCP socket under both ends (a dead link): the client
    /// sees EOF, the server's session ends. Listeners of those connections are gone.
    pub fn drop_connections(&self) {
        let mut state = self.state.lock().unwrap();
        for conn in state.conns.iter_mut() {
            if let Some(s) = conn.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        state.forwards.clear();
    }

    /// The ports clients listen on (`tcpip-forward`), sorted.
    pub fn forwarded_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .state
            .lock()
            .unwrap()
            .forwards
            .keys()
            .copied()
            .collect();
        ports.sort_unstable();
        ports
    }

    /// A cloud caller from `caller` connects to the forwarded `port`: opens the
    /// `forwarded-tcpip` channel to the client that listens there (None: nobody does, or the
    /// client refused the channel).
    /// The future owns what it needs: it may be spawned while the test drives the app.
    pub fn call(
        &self,
        port: u16,
        caller: SocketAddr,
    ) -> impl Future<Output = Option<Channel<Msg>>> + Send + 'static {
        let fwd = self.state.lock().unwrap().forwards.get(&port).cloned();
        async move {
            let fwd = fwd?;
            fwd.handle
                .channel_open_forwarded_tcpip(
                    fwd.address,
                    port.into(),
                    caller.ip().to_string(),
                    caller.port().into(),
                )
                .await
                .ok()
        }
    }
}

/// Writes `key` as an OpenSSH private key file (mode 0600 on Unix).
fn write_private(path: &Path, key: &PrivateKey) {
    let text = key.to_openssh(LineEnding::LF).expect("encode key");
    std::fs::write(path, text.as_bytes()).expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    }
}

/// The server's configuration with `host_key`; no delay on failed logins.
fn server_config(host_key: PrivateKey) -> Arc<server::Config> {
    Arc::new(server::Config {
        keys: vec![host_key],
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        ..server::Config::default()
    })
}

async fn accept_loop(listener: TcpListener, user: PublicKey, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let refuse = {
            let mut s = state.lock().unwrap();
            s.attempts.push(tokio::time::Instant::now());
            if s.down {
                continue;
            }
            let refuse = s.refuse > 0;
            if s.refuse != usize::MAX {
                s.refuse = s.refuse.saturating_sub(1);
            }
            refuse
        };
        if refuse {
            // Closed with the client's banner unread: the kernel resets the connection.
            tokio::spawn(async move {
                let _ = stream.readable().await;
                drop(stream);
            });
            continue;
        }
        // A second handle on the socket, to cut it from the test.
        let std = stream.into_std().expect("into_std");
        let killer = std.try_clone().expect("clone socket");
        let stream = TcpStream::from_std(std).expect("from_std");
        let (conn, config) = {
            let mut s = state.lock().unwrap();
            s.conns.push(Some(killer));
            (
                s.conns.len() - 1,
                s.config.clone().expect("a configuration"),
            )
        };
        {
            let mut s = state.lock().unwrap();
            s.pending += 1;
            s.max_pending = s.max_pending.max(s.pending);
        }
        let logged_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Conn {
            conn,
            user: user.clone(),
            state: state.clone(),
            logged_in: logged_in.clone(),
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(session) = server::run_stream(config, stream, handler).await {
                let _ = session.await;
            }
            if !logged_in.load(std::sync::atomic::Ordering::Relaxed) {
                state.lock().unwrap().pending -= 1;
            }
        });
    }
}

/// One client connection's handler.
struct Conn {
    conn: usize,
    user: PublicKey,
    state: Arc<Mutex<State>>,
    /// Set once the client logged in.
    logged_in: Arc<std::sync::atomic::AtomicBool>,
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if key.public_key.key_data() == self.user.key_data() {
            if !self
                .logged_in
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                self.state.lock().unwrap().pending -= 1;
            }
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let port = u16::try_from(port_to_connect).unwrap_or(0);
        {
            let mut state = self.state.lock().unwrap();
            state.opens.push((host_to_connect.to_owned(), port));
            if state.silent.contains(&port) {
                state.held.push((channel, reply));
                return Ok(());
            }
        }
        // As sshd does: answer the open once the connect is done. Off the session loop.
        tokio::spawn(async move {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(mut tcp) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let mut state = self.state.lock().unwrap();
        if *port == 0 {
            *port = state.next_port.into();
            state.next_port += 1;
        }
        let Ok(bound) = u16::try_from(*port) else {
            return Ok(false);
        };
        if state.forwards.contains_key(&bound) {
            return Ok(false);
        }
        state.forwards.insert(
            bound,
            Forward {
                conn: self.conn,
                address: address.to_owned(),
                handle: session.handle(),
            },
        );
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let mut state = self.state.lock().unwrap();
        let conn = self.conn;
        let ours = u16::try_from(port)
            .ok()
            .filter(|p| state.forwards.get(p).is_some_and(|f| f.conn == conn));
        Ok(ours.and_then(|p| state.forwards.remove(&p)).is_some())
    }
}
