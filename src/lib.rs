//! mse-vpn: skeleton (filled in by the outbound issue).
pub mod ssh;
