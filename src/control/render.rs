//! The human table of `mse-vpn status`, made from a [`Status`] document. Pure: it returns
//! text and prints nothing (the CLI does).

use super::schema::{LinkState, Status};
use crate::reverse::ForwardState;

/// Renders a status as the compact human table of `mse-vpn status`.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let state = match st.state {
        LinkState::Connected => "connected",
        LinkState::Reconnecting => "RECONNECTING",
        LinkState::Stopping => "stopping",
    };
    let up = st.uptime_secs;
    out.push_str(&format!(
        "state       {state} ({}/{} connections up)\njump host   {}\ntun         {} (pid {})\nuptime      {}h{:02}m{:02}s\nroutes      {}\nflows       {} active, {} closing, {} opened, {} refused, {} over limit\nbytes       {} up, {} down\nreconnects  {}\n",
        st.connections_up,
        st.connections,
        st.jump,
        st.tun,
        st.pid,
        up / 3600,
        up / 60 % 60,
        up % 60,
        st.routes.join(", "),
        st.flows_active,
        st.flows_closing,
        st.flows_opened,
        st.flows_refused,
        st.flows_over_limit,
        crate::logging::bytes(st.bytes_up),
        crate::logging::bytes(st.bytes_down),
        st.reconnects
    ));
    if let Some(pid) = st.app_pid {
        out.push_str(&format!(
            "app         pid {pid}, a `run` session: the app has a network of its own (no root, nothing changed on this machine)\n"
        ));
    }
    if st.memory_budget > 0 {
        out.push_str(&format!(
            "memory      {} in windows + {} buffered, of a {} budget\n",
            crate::logging::bytes(st.memory_windows),
            crate::logging::bytes(st.memory_buffered),
            crate::logging::bytes(st.memory_budget)
        ));
    }
    if st.tun_write_drops + st.tun_read_errors > 0 {
        out.push_str(&format!(
            "tun errors  {} packets dropped on write, {} failed reads (passing; the session went on)\n",
            st.tun_write_drops, st.tun_read_errors
        ));
    }
    if st.max_inbound > 0 {
        out.push_str(&format!(
            "limits      {} outbound flows; {} cloud callers ({} connected)\n",
            st.max_flows, st.max_inbound, st.inbound_active
        ));
    }
    for f in &st.forwards {
        let remote = f
            .advertised
            .clone()
            .or_else(|| f.remote_port.map(|p| format!("<jump host>:{p}")))
            .unwrap_or_else(|| f.spec.clone());
        let state = match f.state {
            ForwardState::Listening => "listening",
            ForwardState::Waiting => "WAITING",
            ForwardState::Failed => "FAILED",
        };
        out.push_str(&format!(
            "exposed     {remote} -> local :{} {state}, {} call{}{}\n",
            f.local_port,
            f.connections,
            if f.connections == 1 { "" } else { "s" },
            f.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
    }
    if let Some(d) = &st.dns {
        out.push_str(&format!(
            "dns         {} on {} → {} for {}\ndns queries {} via tunnel, {} via original nameservers, {} servfail, {} refused, {} truncated\n",
            d.mode,
            d.listen,
            d.servers.join(", "),
            d.domains.join(", "),
            d.via_tunnel,
            d.via_upstream,
            d.servfail,
            d.refused,
            d.truncated
        ));
    }
    // The latest state change (not the first entry: the session's start).
    if let Some(last) = st.history.iter().skip(1).next_back() {
        let ago = duration((st.started_unix + st.uptime_secs).saturating_sub(last.at_unix));
        let what = match (last.state, last.detail.as_deref()) {
            (LinkState::Reconnecting, Some(d)) => format!("lost the jump host, reconnecting: {d}"),
            (LinkState::Reconnecting, None) => "lost the jump host, reconnecting".to_owned(),
            (LinkState::Connected, Some(d)) => d.to_owned(),
            (LinkState::Connected, None) => "reconnected".to_owned(),
            (LinkState::Stopping, _) => "stopping".to_owned(),
        };
        out.push_str(&format!("last event  {what} ({ago} ago)\n"));
    }
    out
}

/// A duration for people: `18 s`, `3 min`, `2 h 5 min`.
pub(super) fn duration(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_for_people() {
        assert_eq!(duration(18), "18 s");
        assert_eq!(duration(600), "10 min");
        assert_eq!(duration(7500), "2 h 5 min");
    }
}
