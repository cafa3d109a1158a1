//! The ssh-agent transport, per OS: a Unix socket (`SSH_AUTH_SOCK`) on Linux and macOS; on
//! Windows OpenSSH's agent pipe (`\\.\pipe\openssh-ssh-agent`, or the pipe `SSH_AUTH_SOCK`
//! names) and, when that is not running, PuTTY's Pageant. The agent protocol itself is
//! russh's.

use std::path::Path;

use russh::keys::agent::client::{AgentClient, AgentStream};

/// An agent connection, whatever carries it.
pub type Agent = AgentClient<Box<dyn AgentStream + Send + Unpin + 'static>>;

/// Where OpenSSH for Windows' agent listens when `SSH_AUTH_SOCK` does not say.
#[cfg(windows)]
pub const DEFAULT_AGENT: &str = r"\\.\pipe\openssh-ssh-agent";

/// Connects to the agent at `path`.
pub async fn connect(path: &Path) -> Result<Agent, russh::keys::Error> {
    #[cfg(unix)]
    return Ok(AgentClient::connect_uds(path).await?.dynamic());
    #[cfg(windows)]
    match AgentClient::connect_named_pipe(path).await {
        Ok(agent) => Ok(agent.dynamic()),
        Err(pipe) => match AgentClient::connect_pageant().await {
            Ok(agent) => Ok(agent.dynamic()),
            Err(_) => Err(pipe),
        },
    }
}
