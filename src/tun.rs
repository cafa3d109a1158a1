//! The TUN device: the one file of the main crate that opens an OS network device.
//!
//! It only creates the device (name, packet I/O). Addresses, MTU, link state and routes are
//! the platform crate's job, journaled there so that a crash can be undone.

use std::io;

use thiserror::Error;

/// Failure to create the TUN device.
#[derive(Debug, Error)]
pub enum TunError {
    /// The device could not be created (no `/dev/net/tun`, not root, or the name is in use).
    #[error(
        "could not create TUN device {name}: {source}. mse-vpn needs root (sudo) and /dev/net/tun; \
         if the name is in use by another session, pick another with --tun"
    )]
    Create {
        /// The requested name.
        name: String,
        /// The underlying error.
        #[source]
        source: tun::Error,
    },
}

/// An open TUN device; packets are raw IPv4/IPv6 datagrams without a header.
pub struct Tun {
    dev: tun::AsyncDevice,
    name: String,
}

impl Tun {
    /// Creates the TUN device `name` (it disappears, with its routes, when this is dropped).
    pub fn create(name: &str, mtu: u16) -> Result<Tun, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).mtu(mtu).layer(tun::Layer::L3);
        // Configuration (addresses, MTU, up) is done by the platform crate over netlink.
        config.platform_config(|p| {
            p.ensure_root_privileges(false);
        });
        let dev = tun::create_as_async(&config).map_err(|source| TunError::Create {
            name: name.to_owned(),
            source,
        })?;
        Ok(Tun {
            dev,
            name: name.to_owned(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet into `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    /// Writes one packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet).await
    }
}
