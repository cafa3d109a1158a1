//! The status board: the facts a [`Status`] document is made of, gathered from the parts of a
//! running session. It follows the pool's link events ([`LinkObserver`]), the current
//! driver's counters (a `watch` of [`EngineStats`]), the exposed ports ([`Forwards`]) and the
//! split-DNS counters, and makes a document on request. No I/O and no printing.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::render::duration;
use super::schema::{LinkState, STATUS_VERSION, StateChange, Status};
use crate::dns::{DnsCounters, DnsStatus};
use crate::engine::EngineStats;
use crate::pool::{LinkEvent, LinkObserver};
use crate::reverse::Forwards;

/// The most state changes a status keeps.
const HISTORY: usize = 32;

/// Shared, updatable session facts from which [`Status`] documents are made.
pub struct Board {
    /// The document, as far as it is kept here: identity, link state, history, and the
    /// counters of drivers that ended.
    inner: Mutex<Status>,
    /// What the board follows, set as the session starts its parts.
    sources: Mutex<Sources>,
    /// When the session started (for `uptime_secs`).
    started: Instant,
}

/// The live parts of the session a snapshot reads.
#[derive(Default)]
struct Sources {
    /// The exposed ports.
    forwards: Option<Arc<Forwards>>,
    /// The current driver's counters.
    stats: Option<watch::Receiver<EngineStats>>,
    /// Split DNS's counters.
    dns: Option<Arc<DnsCounters>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl Board {
    /// A board for a new session.
    pub fn new(jump: String, tun: String, routes: Vec<String>) -> Arc<Board> {
        let now = unix_now();
        Arc::new(Board {
            inner: Mutex::new(Status {
                version: STATUS_VERSION,
                pid: std::process::id(),
                jump,
                tun,
                routes,
                state: LinkState::Connected,
                started_unix: now,
                uptime_secs: 0,
                reconnects: 0,
                connections: 0,
                connections_up: 0,
                flows_active: 0,
                flows_closing: 0,
                memory_budget: 0,
                memory_windows: 0,
                memory_buffered: 0,
                tun_write_drops: 0,
                tun_read_errors: 0,
                flows_opened: 0,
                flows_refused: 0,
                flows_over_limit: 0,
                bytes_up: 0,
                bytes_down: 0,
                history: vec![StateChange {
                    at_unix: now,
                    state: LinkState::Connected,
                    detail: None,
                }],
                inbound_opened: 0,
                inbound_refused: 0,
                inbound_active: 0,
                max_flows: 0,
                max_inbound: 0,
                forwards: Vec::new(),
                dns: None,
                app_pid: None,
            }),
            sources: Mutex::new(Sources::default()),
            started: Instant::now(),
        })
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The app of a `run` session that runs in a namespace of its own.
    pub fn set_app(&self, pid: u32) {
        self.status().app_pid = Some(pid);
    }

    /// The flow budgets shown by `status` (`--max-flows`, `--max-inbound`).
    pub fn set_limits(&self, max_flows: u64, max_inbound: u64) {
        let mut st = self.status();
        st.max_flows = max_flows;
        st.max_inbound = max_inbound;
    }

    /// The session's exposed ports, shown by `status` and extended by `expose` requests.
    pub fn set_forwards(&self, forwards: Arc<Forwards>) {
        self.sources().forwards = Some(forwards);
    }

    /// The session's exposed ports, if it can expose any.
    pub fn forwards(&self) -> Option<Arc<Forwards>> {
        self.sources().forwards.clone()
    }

    /// Follows the counters of the current driver.
    pub fn follow(&self, stats: watch::Receiver<EngineStats>) {
        let mut sources = self.sources();
        // Counters restart with each driver: fold the old driver's totals in first.
        if let Some(old) = sources.stats.take() {
            add(&mut self.status(), &old.borrow());
        }
        sources.stats = Some(stats);
    }

    /// Shows split DNS (its settings, and `counters` as they grow) in the status.
    pub fn set_dns(&self, dns: DnsStatus, counters: Arc<DnsCounters>) {
        self.status().dns = Some(dns);
        self.sources().dns = Some(counters);
    }

    /// Records a link state change.
    pub fn set_state(&self, state: LinkState, detail: Option<String>) {
        let mut st = self.status();
        if state == LinkState::Connected && st.state == LinkState::Reconnecting {
            st.reconnects += 1;
        }
        st.state = state;
        st.history.push(StateChange {
            at_unix: unix_now(),
            state,
            detail,
        });
        let excess = st.history.len().saturating_sub(HISTORY);
        st.history.drain(..excess);
    }

    /// Records how many of the pool's `total` connections are up. The link is connected
    /// while at least one is; a change between none and some is a state change.
    pub fn set_links(&self, up: usize, total: usize, detail: Option<String>) {
        let state = {
            let mut st = self.status();
            st.connections = total as u32;
            st.connections_up = up as u32;
            st.state
        };
        match (state, up) {
            (LinkState::Connected, 0) => self.set_state(LinkState::Reconnecting, detail),
            (LinkState::Reconnecting, n) if n > 0 => {
                let lost_at = self
                    .status()
                    .history
                    .iter()
                    .rev()
                    .find(|c| c.state == LinkState::Reconnecting)
                    .map(|c| c.at_unix);
                let detail = lost_at.map(|at| {
                    format!(
                        "reconnected after {}",
                        duration(unix_now().saturating_sub(at))
                    )
                });
                self.set_state(LinkState::Connected, detail)
            }
            (LinkState::Reconnecting, _) => {
                // Still down: keep the latest reason without growing the history.
                if let Some(d) = detail
                    && let Some(last) = self.status().history.last_mut()
                {
                    last.detail = Some(d);
                }
            }
            _ => {}
        }
    }

    /// The current status document.
    pub fn snapshot(&self) -> Status {
        let mut st = self.status().clone();
        st.uptime_secs = self.started.elapsed().as_secs();
        let sources = self.sources();
        if let Some(rx) = sources.stats.as_ref() {
            let e = *rx.borrow();
            st.flows_active = e.flows_active;
            st.flows_closing = e.flows_closing;
            st.memory_budget = e.memory_budget;
            st.memory_windows = e.windows;
            st.memory_buffered = e.buffered;
            st.inbound_active = e.inbound_active;
            add(&mut st, &e);
        }
        if let Some(f) = sources.forwards.as_ref() {
            st.forwards = f.status();
        }
        if let Some(c) = sources.dns.as_ref()
            && let Some(dns) = st.dns.take()
        {
            st.dns = Some(dns.with_counters(c));
        }
        st
    }
}

/// Adds a driver's running totals to a document's.
fn add(st: &mut Status, e: &EngineStats) {
    st.flows_opened += e.flows_opened;
    st.flows_refused += e.flows_refused;
    st.flows_over_limit += e.flows_over_limit;
    st.bytes_up += e.bytes_up;
    st.bytes_down += e.bytes_down;
    st.inbound_opened += e.inbound_opened;
    st.inbound_refused += e.inbound_refused;
    st.tun_write_drops += e.tun_write_drops;
    st.tun_read_errors += e.tun_read_errors;
}

impl LinkObserver for Board {
    fn link_event(&self, event: LinkEvent) {
        self.set_links(event.up, event.total, event.detail);
    }
}
