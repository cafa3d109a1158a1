//! The control protocol's messages: the [`Request`] a client sends, the replies a session
//! sends back ([`Status`], [`ExposeReply`], [`Ack`], [`ErrorReply`]). Plain data and serde, no
//! I/O.
//!
//! One JSON line each way. A request is tagged by `cmd` (`{"cmd":"status"}`,
//! `{"cmd":"expose","specs":["8080"],"hold":true}`). The reply to `status` is a [`Status`],
//! whose fields are the stable, documented `status --json` format (version 1: new fields may
//! be added; none are renamed or removed). A refused request is answered with an
//! [`ErrorReply`]: a line for people (`error`) and a machine-readable [`ErrorCode`] (`code`).

use serde::{Deserialize, Serialize};

use crate::dns::DnsStatus;
use crate::reverse::{ForwardSpec, ForwardStatus};

/// The version of the [`Status`] document.
pub const STATUS_VERSION: u32 = 1;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The session's [`Status`].
    Status,
    /// Stop the session (answered with an [`Ack`] before it stops).
    Down,
    /// Add listeners on the jump host; answered with an [`ExposeReply`].
    Expose {
        /// The `--expose` values.
        #[serde(default, with = "spec_text", skip_serializing_if = "Vec::is_empty")]
        specs: Vec<ForwardSpec>,
        /// Remove the new listeners when this connection closes (`mse-vpn run`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hold: bool,
    },
    /// Remove listeners; answered with an empty [`ExposeReply`].
    Unexpose {
        /// The `--expose` values to remove.
        #[serde(default, with = "spec_text", skip_serializing_if = "Vec::is_empty")]
        specs: Vec<ForwardSpec>,
    },
}

/// The `cmd` values a session understands.
pub const COMMANDS: [&str; 4] = ["status", "down", "expose", "unexpose"];

impl Request {
    /// Parses a request line; what cannot be parsed is the [`ErrorReply`] to send instead.
    pub fn parse(line: &str) -> Result<Request, ErrorReply> {
        serde_json::from_str(line).map_err(|e| {
            #[derive(Deserialize)]
            struct Cmd {
                cmd: String,
            }
            match serde_json::from_str::<Cmd>(line) {
                Ok(Cmd { cmd }) if !COMMANDS.contains(&cmd.as_str()) => ErrorReply::new(
                    ErrorCode::UnknownRequest,
                    format!(
                        "unknown request {cmd:?} (this session understands {})",
                        COMMANDS.join(", ")
                    ),
                ),
                _ => ErrorReply::new(ErrorCode::Malformed, format!("malformed request: {e}")),
            }
        })
    }
}

/// `--expose` values on the wire: their text, as typed.
mod spec_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::reverse::ForwardSpec;

    pub fn serialize<S: Serializer>(specs: &[ForwardSpec], s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = specs.iter().map(ToString::to_string).collect();
        text.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ForwardSpec>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Why a session refused a request (the `code` of an [`ErrorReply`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The `cmd` is not one this session knows (a client newer than the session).
    UnknownRequest,
    /// The line is not a well-formed request (a client bug, or a bad `--expose` value).
    Malformed,
    /// The session cannot expose ports (it was started without the means to).
    CannotExpose,
    /// Some of the ports to unexpose were not exposed (the user named the wrong port).
    NotExposed,
    /// A code this version does not know, or none (a session of an older version).
    #[default]
    #[serde(other)]
    Other,
}

/// The reply to a refused request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What happened, for people.
    pub error: String,
    /// What happened, for programs.
    #[serde(default)]
    pub code: ErrorCode,
}

impl ErrorReply {
    /// A refusal with its code and message.
    pub fn new(code: ErrorCode, error: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: error.into(),
            code,
        }
    }
}

/// The reply to `down`: the session is stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always true.
    pub ok: bool,
}

/// The reply to an `expose` request (and, empty, to `unexpose`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeReply {
    /// The listeners asked for, in order, as `status` shows them.
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
}

/// The state of the SSH link, as shown by `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Connected; flows are carried.
    Connected,
    /// The connection was lost; mse-vpn is reconnecting (routes stay in place).
    Reconnecting,
    /// Shutting down.
    Stopping,
}

/// One state change, for the `status` history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// Unix time in seconds.
    pub at_unix: u64,
    /// The new state.
    pub state: LinkState,
    /// Why (for a loss or a failed reconnect).
    pub detail: Option<String>,
}

/// The `status --json` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Format version of this document: [`STATUS_VERSION`].
    pub version: u32,
    /// Process id of the session.
    pub pid: u32,
    /// The jump host, as `user@host:port`.
    pub jump: String,
    /// The TUN device name.
    pub tun: String,
    /// The routed networks.
    pub routes: Vec<String>,
    /// Current link state.
    pub state: LinkState,
    /// Unix time the session started.
    pub started_unix: u64,
    /// Seconds since the session started.
    pub uptime_secs: u64,
    /// Successful reconnects since start (the link came back after an outage).
    pub reconnects: u64,
    /// SSH connections in the pool.
    #[serde(default)]
    pub connections: u32,
    /// SSH connections up right now.
    #[serde(default)]
    pub connections_up: u32,
    /// Flows open right now.
    pub flows_active: u64,
    /// Flows that ended whose SSH channel is still writing what it held (at most
    /// `close_linger`); they count against the flow limits.
    #[serde(default)]
    pub flows_closing: u64,
    /// Flows admitted since start.
    pub flows_opened: u64,
    /// Flows refused (the jump host could not connect) since start.
    pub flows_refused: u64,
    /// New connections reset because of the flow limit.
    pub flows_over_limit: u64,
    /// Bytes from local apps into the tunnel.
    pub bytes_up: u64,
    /// Bytes from the tunnel to local apps.
    pub bytes_down: u64,
    /// The last state changes, oldest first (at most 32).
    pub history: Vec<StateChange>,
    /// Cloud callers' connections to exposed ports accepted since start.
    #[serde(default)]
    pub inbound_opened: u64,
    /// Cloud callers not accepted on the TUN address (closed or silent port, or an app on
    /// loopback only, which is then reached over loopback).
    #[serde(default)]
    pub inbound_refused: u64,
    /// Cloud callers connected right now (counted against `max_inbound`).
    #[serde(default)]
    pub inbound_active: u64,
    /// `--max-flows`: the budget of outbound flows.
    #[serde(default)]
    pub max_flows: u64,
    /// `--max-inbound`: the budget of cloud callers, separate from `max_flows`.
    #[serde(default)]
    pub max_inbound: u64,
    /// `--memory-budget`, in bytes (see `memory_windows` and `memory_buffered`).
    #[serde(default)]
    pub memory_budget: u64,
    /// Bytes of SSH receive windows committed to channels (what the jump host may send
    /// without asking), counted against the memory budget.
    #[serde(default)]
    pub memory_windows: u64,
    /// Bytes the engine holds for flows (for apps, and for channels), counted against the
    /// memory budget.
    #[serde(default)]
    pub memory_buffered: u64,
    /// Packets for the TUN dropped because writing them failed for a passing reason
    /// (`ENOBUFS`, the link down), and TUN reads that failed so; the session went on.
    #[serde(default)]
    pub tun_write_drops: u64,
    /// See `tun_write_drops`.
    #[serde(default)]
    pub tun_read_errors: u64,
    /// The exposed ports (`--expose`, `mse-vpn run --expose`).
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Split DNS, when `--dns-domain` is in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// A `run` session's app (`mse-vpn run --cidr ... --proxy ...` without root): its pid.
    /// The app lives in a network namespace of its own whose only way out is this session's
    /// TUN. Absent for an `up` session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_pid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_lines_earlier_versions_sent() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Down, r#"{"cmd":"down"}"#),
            (
                Request::Expose {
                    specs: vec!["8080".parse().unwrap(), "0:9090".parse().unwrap()],
                    hold: true,
                },
                r#"{"cmd":"expose","specs":["8080:8080","0:9090"],"hold":true}"#,
            ),
            (
                Request::Unexpose {
                    specs: vec!["8080".parse().unwrap()],
                },
                r#"{"cmd":"unexpose","specs":["8080:8080"]}"#,
            ),
        ];
        for (req, line) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), line);
            assert_eq!(Request::parse(line).unwrap(), req, "{line}");
        }
        // `hold` may be left out, as earlier clients did.
        assert_eq!(
            Request::parse(r#"{"cmd":"expose","specs":["8080"]}"#).unwrap(),
            Request::Expose {
                specs: vec!["8080".parse().unwrap()],
                hold: false
            }
        );
    }

    #[test]
    fn an_unknown_or_malformed_request_is_a_clear_refusal() {
        let e = Request::parse(r#"{"cmd":"reboot"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownRequest);
        assert!(e.error.contains("\"reboot\""), "{}", e.error);
        assert!(
            e.error.contains("status, down, expose, unexpose"),
            "{}",
            e.error
        );

        for line in [
            "not json",
            "{}",
            r#"{"cmd":"expose","specs":["no:such:spec:x"]}"#,
        ] {
            let e = Request::parse(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::Malformed, "{line}");
            assert!(e.error.starts_with("malformed request: "), "{}", e.error);
        }
    }

    #[test]
    fn error_replies_round_trip_and_old_ones_still_parse() {
        let e = ErrorReply::new(
            ErrorCode::NotExposed,
            "some of these ports were not exposed",
        );
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"error":"some of these ports were not exposed","code":"not_exposed"}"#
        );
        assert_eq!(serde_json::from_str::<ErrorReply>(&line).unwrap(), e);
        // A session of an earlier version sent the message only.
        let old: ErrorReply = serde_json::from_str(r#"{"forwards":[],"error":"no"}"#).unwrap();
        assert_eq!(old, ErrorReply::new(ErrorCode::Other, "no"));
        let newer: ErrorReply = serde_json::from_str(r#"{"error":"x","code":"later"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Other);
    }
}
