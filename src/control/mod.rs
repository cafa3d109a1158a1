//! The control socket: a running session answers requests from `mse-vpn status`, `down`,
//! `expose`, `unexpose`, `env` and `run` on a Unix socket at `/run/mse-vpn/<tun>.sock`,
//! readable by root and the user who started it only (on Windows a named pipe with an
//! owner-only ACL: the transport is `mse_vpn_platform::ipc`).
//!
//! ```text
//!  pool ──LinkEvent──▶ ┌───────┐                      ┌────────┐
//!  driver ──stats────▶ │ Board │ ◀── snapshot() ───── │ Server │ ◀── one JSON line ── client
//!  forwards, dns ────▶ └───────┘                      └────────┘ ─── one JSON line ──▶
//! ```
//!
//! - [`schema`]: the typed messages ([`Request`], [`Status`], [`ExposeReply`], [`ErrorReply`]);
//!   the `status --json` document is versioned and its fields stable.
//! - [`board`]: the [`Board`] that gathers a running session's facts into a [`Status`].
//! - [`server`]: the session's side (accept, answer, `down` → the stop signal).
//! - [`client`]: the CLI's side: a request out, a typed reply or [`ControlError`] back.
//! - [`render`](mod@render): the human table of `mse-vpn status`.
//!
//! Nothing here prints; the CLI does.

use std::path::{Path, PathBuf};

use mse_vpn_platform::ipc;
use thiserror::Error;

pub mod board;
pub mod client;
pub mod render;
pub mod schema;
pub mod server;

pub use board::Board;
pub use client::{down, expose, status, unexpose};
pub use render::render;
pub use schema::{
    ErrorCode, ErrorReply, ExposeReply, LinkState, Request, STATUS_VERSION, StateChange, Status,
};
pub use server::Server;

/// Errors of the control socket, on either side.
#[derive(Debug, Error)]
pub enum ControlError {
    /// No session is running (no socket, or nobody answers on it).
    #[error("no mse-vpn session is running (nothing answers on {path})")]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// The socket exists but this user may not use it.
    #[error(
        "permission denied on {path}: only root and the user who started the session may use it"
    )]
    Denied {
        /// The socket path.
        path: PathBuf,
    },
    /// Socket I/O failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The session refused the request (a bad port, a port not exposed, a request it does
    /// not know).
    #[error("the session refused the request: {message}")]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The other side sent something that is not the expected JSON.
    #[error("control socket {path}: malformed reply: {source}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// The socket path of the session using TUN `tun`.
pub fn socket_path(state_dir: &Path, tun: &str) -> PathBuf {
    ipc::endpoint(state_dir, tun)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::sync::watch;

    use super::*;
    use crate::engine::EngineStats;

    #[tokio::test]
    async fn status_and_down_round_trip_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-ctl-{}", std::process::id()));
        let path = socket_path(&dir, "mvtest0");
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let server = Server::bind(&path, me.uid, me.gid).unwrap();
        let board = Board::new(
            "u@h:22".into(),
            "mvtest0".into(),
            vec!["10.0.0.0/16".into()],
        );
        let (stats_tx, stats_rx) = watch::channel(EngineStats::default());
        board.follow(stats_rx);
        stats_tx.send_replace(EngineStats {
            flows_active: 2,
            bytes_up: 10,
            ..Default::default()
        });
        board.set_state(LinkState::Reconnecting, Some("keepalive timeout".into()));
        board.set_state(LinkState::Connected, None);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        tokio::spawn(server.serve(board.clone(), stop_tx));

        let st = status(&path).await.unwrap();
        assert_eq!(st.flows_active, 2);
        assert_eq!(st.bytes_up, 10);
        assert_eq!(st.reconnects, 1);
        assert_eq!(st.state, LinkState::Connected);
        assert_eq!(st.history.len(), 3);
        let table = render(&st);
        assert!(table.contains("bytes       10 B up, 0 B down"), "{table}");
        // The last event is the latest change, not an older one with more words.
        assert!(table.contains("last event  reconnected ("), "{table}");
        board.set_links(0, 4, Some("cannot reach the jump host".into()));
        let table = render(&board.snapshot());
        assert!(
            table.contains(
                "last event  lost the jump host, reconnecting: cannot reach the jump host (0 s ago)"
            ),
            "{table}"
        );
        board.set_links(1, 4, None);
        let table = render(&board.snapshot());
        assert!(
            table.contains("last event  reconnected after 0 s (0 s ago)"),
            "{table}"
        );
        assert!(
            table.contains("state       connected (1/4 connections up)"),
            "{table}"
        );

        assert!(st.dns.is_none(), "no dns object without --dns-domain");
        let counters = Arc::new(crate::dns::DnsCounters::default());
        board.set_dns(
            crate::dns::DnsStatus {
                mode: "resolv.conf".into(),
                listen: "198.18.0.1:53".into(),
                servers: vec!["10.0.0.2".into()],
                domains: vec!["internal".into()],
                upstream: vec!["127.0.0.1:53".into()],
                via_tunnel: 0,
                via_upstream: 0,
                servfail: 0,
                refused: 0,
                truncated: 0,
            },
            counters.clone(),
        );
        counters
            .via_tunnel
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let st = status(&path).await.unwrap();
        let dns = st.dns.as_ref().expect("a dns object");
        assert_eq!((dns.via_tunnel, dns.servfail), (3, 0));
        assert!(render(&st).contains("3 via tunnel"), "{}", render(&st));

        down(&path).await.unwrap();
        stop_rx.wait_for(|s| *s).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_the_socket_keeps_answering() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-ctl-idle-{}", std::process::id()));
        let path = socket_path(&dir, "mvtest1");
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let server = Server::bind(&path, me.uid, me.gid).unwrap();
        let board = Board::new("u@h:22".into(), "mvtest1".into(), Vec::new());
        board.set_limits(500, 40);
        let (stop_tx, _stop_rx) = watch::channel(false);
        let timeout = Duration::from_millis(200);
        tokio::spawn(server.serve_with(board, stop_tx, timeout));

        // Connections that never send a request: more than the server serves at once.
        let mut idle = Vec::new();
        for _ in 0..server::MAX_CLIENTS {
            idle.push(ipc::connect(&path).await.unwrap());
        }
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(timeout * 10, idle[0].read(&mut buf))
            .await
            .expect("the server closes a silent connection");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        let st = status(&path)
            .await
            .expect("answered once the idle ones are gone");
        assert_eq!((st.max_flows, st.max_inbound), (500, 40));
        assert!(render(&st).contains("40 cloud callers"), "{}", render(&st));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_status_document_keeps_its_version_1_fields() {
        let board = Board::new(
            "u@h:22".into(),
            "mvtest3".into(),
            vec!["10.0.0.0/16".into()],
        );
        board.set_links(0, 2, Some("lost".into()));
        let st = board.snapshot();
        let json = serde_json::to_value(&st).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        let mut documented = vec![
            "version",
            "pid",
            "jump",
            "tun",
            "routes",
            "state",
            "started_unix",
            "uptime_secs",
            "reconnects",
            "connections",
            "connections_up",
            "flows_active",
            "flows_closing",
            "flows_opened",
            "flows_refused",
            "flows_over_limit",
            "bytes_up",
            "bytes_down",
            "history",
            "inbound_opened",
            "inbound_refused",
            "inbound_active",
            "max_flows",
            "max_inbound",
            "memory_budget",
            "memory_windows",
            "memory_buffered",
            "tun_write_drops",
            "tun_read_errors",
            "forwards",
        ];
        documented.sort_unstable();
        assert_eq!(keys, documented, "`dns` appears only with --dns-domain");
        assert_eq!(json["version"], 1);
        assert_eq!(json["state"], "reconnecting");
        assert_eq!(json["history"][1]["detail"], "lost");
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
    }

    #[tokio::test]
    async fn no_session_is_a_clear_error() {
        let e = status(Path::new("/nonexistent/mse-vpn/x.sock"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no mse-vpn session is running"));
    }

    #[tokio::test]
    async fn an_unknown_request_is_answered_not_dropped() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = std::env::temp_dir().join(format!("mse-vpn-ctl-unk-{}", std::process::id()));
        let path = socket_path(&dir, "mvtest2");
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let server = Server::bind(&path, me.uid, me.gid).unwrap();
        let board = Board::new("u@h:22".into(), "mvtest2".into(), Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(server.serve(board, stop_tx));

        let conn = ipc::connect(&path).await.unwrap();
        let (r, mut w) = tokio::io::split(conn);
        w.write_all(b"{\"cmd\":\"reboot\"}\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        let refused: ErrorReply = serde_json::from_str(&line).unwrap();
        assert_eq!(refused.code, ErrorCode::UnknownRequest, "{line}");
        // A session without --expose says so to `expose`, typed.
        let e = expose(&path, &["8080".parse().unwrap()], false)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                ControlError::Refused {
                    code: ErrorCode::CannotExpose,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!*stop_rx.borrow());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
