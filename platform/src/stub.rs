//! Operating systems other than Linux, macOS and Windows (a BSD, say): every call answers
//! [`PlatformError::Unsupported`], which says which systems are.

use std::path::Path;

use crate::{Change, ExistingRoute, PlatformError, Preflight, RoutePlan};

#[derive(Debug)]
pub struct Applied;

pub async fn preflight(_: &RoutePlan, _: &Path) -> Result<Preflight, PlatformError> {
    Err(PlatformError::Unsupported)
}

pub async fn apply(_: &RoutePlan, _: &Path) -> Result<Applied, PlatformError> {
    Err(PlatformError::Unsupported)
}

pub async fn restore(_: Applied) -> Result<(), PlatformError> {
    Err(PlatformError::Unsupported)
}

pub async fn repair(_: &Path) -> Result<Vec<Change>, PlatformError> {
    Err(PlatformError::Unsupported)
}

pub async fn overlapping_routes(_: &RoutePlan) -> Result<Vec<ExistingRoute>, PlatformError> {
    Err(PlatformError::Unsupported)
}

pub async fn apply_dns(
    _: &mut Applied,
    _: &str,
    _: &crate::dns::DnsPlan,
    _: &Path,
) -> Result<crate::dns::DnsBackend, PlatformError> {
    Err(PlatformError::Unsupported)
}

/// No session can run here, so none is alive.
pub(crate) fn pid_alive(_: i32) -> bool {
    false
}

pub fn journal_trusted(_: &std::path::Path) -> bool {
    true
}

pub fn pid_alive(_: i32) -> bool {
    false
}
