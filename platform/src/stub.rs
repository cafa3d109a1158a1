//! Operating systems other than Linux, macOS and Windows (a BSD, say): a backend that answers
//! [`PlatformError::Unsupported`], which says which systems are, to everything that would read
//! or change the host.

use std::net::IpAddr;
use std::path::Path;

use crate::dns::{DnsBackend, DnsPlan};
use crate::error::PlatformError;
use crate::host::{Backend, PathInfo, RouteEntry};
use crate::journal::Change;
use crate::plan::RoutePlan;

/// The backend of an unsupported system.
#[derive(Debug)]
pub struct Unsupported;

/// The backend of this system.
pub fn system() -> Unsupported {
    Unsupported
}

impl Backend for Unsupported {
    /// No session can run here, so none is alive.
    fn pid_alive(&self, _pid: i32) -> bool {
        false
    }

    async fn path_to(&mut self, _addr: IpAddr) -> Result<PathInfo, PlatformError> {
        Err(PlatformError::Unsupported)
    }

    async fn routes(&mut self, _plan: &RoutePlan) -> Result<Vec<RouteEntry>, PlatformError> {
        Err(PlatformError::Unsupported)
    }

    async fn make(&mut self, _change: &Change, _plan: &RoutePlan) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported)
    }

    async fn dns_backend(&mut self) -> DnsBackend {
        DnsBackend::ResolvConf
    }

    fn dns_changes(
        &self,
        _dns: DnsBackend,
        _tun: &str,
        _plan: &DnsPlan,
        _state_dir: &Path,
    ) -> Result<Vec<Change>, PlatformError> {
        Err(PlatformError::Unsupported)
    }

    async fn make_dns(
        &mut self,
        _change: &Change,
        _tun: &str,
        _plan: &DnsPlan,
    ) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported)
    }

    async fn undo(&mut self, _change: &Change) -> Result<bool, PlatformError> {
        Err(PlatformError::Unsupported)
    }
}
