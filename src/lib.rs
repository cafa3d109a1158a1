//! mse-vpn (being assembled).
pub mod engine;
pub mod ssh;
