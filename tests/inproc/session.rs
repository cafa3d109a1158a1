//! [`Session::start`] against the in-process jump host, failing at the step after the
//! control socket is bound (a TUN that cannot be created): what it had started is stopped,
//! and nothing keeps answering on the control socket. The TUN step fails before any change
//! to the host, so this runs safely as any user.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use mse_vpn::control;
use mse_vpn::dns::DnsSettings;
use mse_vpn::session::{NetworkConfig, Session, SessionConfig, SessionError};
use mse_vpn::ssh::InvokingUser;
use mse_vpn::tun::{Tun, TunError};

use crate::jump::Jump;
use crate::{LIMIT, wait_for};

/// A TUN that cannot be created (as without root).
fn no_tun(name: &str, _mtu: u16) -> Result<Tun, TunError> {
    Err(TunError::Create {
        name: name.to_owned(),
        source: tun::Error::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
    })
}

/// A fresh state directory.
fn state_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mse-vpn-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_after_binding_the_control_socket_leaves_nothing_serving() {
    const TUN: &str = "mvstart0";
    let jump = Jump::start().await;
    let dir = state_dir();
    let config = SessionConfig {
        ssh: jump.options(),
        network: NetworkConfig {
            cidrs: vec!["10.213.0.0/16".parse().unwrap()],
            excludes: Vec::new(),
            tun: TUN.into(),
            mtu: 1500,
            dns: DnsSettings::default(),
        },
        user: InvokingUser::detect().expect("the current user"),
        state_dir: dir.clone(),
        connections: 1,
        max_flows: 100,
        max_inbound: 10,
        max_opening: 10,
        memory_budget: mse_vpn::budget::DEFAULT_BUDGET,
        open_timeout: Duration::from_secs(5),
        expose: Vec::new(),
        advertise: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    let err = Session::new(config)
        .with_tun(no_tun)
        .start()
        .await
        .err()
        .expect("the start fails");
    assert!(matches!(err, SessionError::Tun(_)), "{err}");
    // The control server it had started is gone with its socket: nobody answers `status`
    // for a session that never came up. (Before, it kept serving, saying "connected".)
    let socket = control::socket_path(&dir, TUN);
    wait_for(LIMIT, || !socket.exists()).await;
    assert!(control::client::status(&socket).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
