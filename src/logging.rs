//! What the user reads on stderr: the log format for each verbosity, errors reported as one
//! line, and byte counts for people (`59.6 MiB`, also used by `status`). Never touches the
//! network or the host.
//!
//! * Default: only lifecycle events and warnings, each as one line like ssh's
//!   (`mse-vpn: warning: lost the connection to the jump host …`), with a UTC timestamp in
//!   front in a `--daemon` log file (journald and terminals need none).
//! * `-v`: mse-vpn's debug events (each connection, flow, setting) with time, level and span
//!   (`flow{id=7 src=… dst=…}`); `-vv`: mse-vpn's traces; `-vvv`: also the SSH library's own
//!   messages, with their origin. `RUST_LOG` overrides the filter.

use std::error::Error;
use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber for `verbose` (the count of `-v`); `timestamps` puts the
/// time in front of every line of the default format too.
pub fn init(verbose: u8, timestamps: bool) {
    let default = match verbose {
        0 => "warn,mse_vpn=info,mse_vpn_platform=info",
        1 => "warn,mse_vpn=debug,mse_vpn_platform=debug",
        2 => "warn,mse_vpn=trace,mse_vpn_platform=trace",
        _ => "mse_vpn=trace,mse_vpn_platform=trace,russh=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal && std::env::var_os("NO_COLOR").is_none());
    let _ = if verbose == 0 {
        builder.event_format(Plain { timestamps }).try_init()
    } else {
        builder.with_target(verbose >= 3).try_init()
    };
}

/// The default format: `mse-vpn: [warning: ]message [key=value ...]`.
struct Plain {
    /// Prefix each line with the UTC time.
    timestamps: bool,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.timestamps {
            SystemTime.format_time(&mut w)?;
            w.write_char(' ')?;
        }
        w.write_str("mse-vpn: ")?;
        match *event.metadata().level() {
            Level::ERROR => w.write_str("error: ")?,
            Level::WARN => w.write_str("warning: ")?,
            _ => {}
        }
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// An error and its causes as one line, each cause once: a cause whose text the line already
/// holds (a message that embeds its source) is not repeated, and the OS error numbers that
/// `std::io::Error` appends (" (os error 111)") are left out, as ssh leaves them out.
pub fn one_line<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = without_os_error(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// [`one_line`] for an error and the causes it reaches through `source()`.
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    one_line(std::iter::successors(Some(e), |&e| e.source()))
}

/// A byte count for people: `512 B`, `1.5 KiB`, `59.6 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `text` without the " (os error N)" that `std::io::Error` appends.
fn without_os_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        let tail = &rest[at + " (os error ".len()..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..at]);
        if digits > 0 && tail[digits..].starts_with(')') {
            rest = &tail[digits + 1..];
        } else {
            out.push_str(" (os error ");
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that embeds its source in its own message, as many of ours do.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach the jump host at 10.99.0.2:2222: {source}. Check the port")]
    struct Embeds {
        #[source]
        source: std::io::Error,
    }

    /// An error that does not.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot use password file /p")]
    struct Plainly {
        #[source]
        source: std::io::Error,
    }

    fn refused() -> std::io::Error {
        #[cfg(unix)]
        return std::io::Error::from_raw_os_error(111); // ECONNREFUSED
        // Elsewhere the OS words it differently: the same text, without an OS code.
        #[cfg(not(unix))]
        return std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Embeds { source: refused() };
        let chain: Vec<&(dyn Error + 'static)> = vec![&e, &e.source];
        assert_eq!(
            one_line(chain),
            "cannot reach the jump host at 10.99.0.2:2222: Connection refused. Check the port"
        );
    }

    #[test]
    fn other_causes_are_appended_once() {
        let e = Plainly { source: refused() };
        let chain: Vec<&(dyn Error + 'static)> = vec![&e, &e.source];
        assert_eq!(
            one_line(chain),
            "cannot use password file /p: Connection refused"
        );
    }

    #[test]
    fn byte_counts_for_people() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(62_531_928), "59.6 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn os_error_numbers_are_dropped_and_other_parentheses_kept() {
        assert_eq!(
            without_os_error("Connection refused (os error 111) and (os error x)"),
            "Connection refused and (os error x)"
        );
        assert_eq!(without_os_error("plain"), "plain");
    }
}
