//! The TUN device: the one file of the main crate that opens an OS network device.
//!
//! It only creates the device (name, packet I/O). Addresses, MTU, link state and routes are
//! the platform crate's job, journaled there so that a crash can be undone.

use std::io;

use thiserror::Error;

/// Failure to create the TUN device.
#[derive(Debug, Error)]
pub enum TunError {
    /// The device could not be created (no `/dev/net/tun`, not root, or the name is in use;
    /// on macOS a name that is not `utunN`; on Windows no `wintun.dll` or no elevation).
    #[error("could not create TUN device {name}: {source}. {HINT}")]
    Create {
        /// The requested name.
        name: String,
        /// The underlying error.
        #[source]
        source: tun::Error,
    },
}

/// What to check when the device cannot be created.
#[cfg(target_os = "linux")]
const HINT: &str = "mse-vpn needs root (sudo) and /dev/net/tun; if the name is in use by another session, pick another with --tun";
/// What to check when the device cannot be created.
#[cfg(target_os = "macos")]
const HINT: &str = "mse-vpn needs root (sudo), and macOS names its TUN devices utun0, utun1, ...: pass --tun utunN with a number no other VPN uses";
/// What to check when the device cannot be created.
#[cfg(windows)]
const HINT: &str = "mse-vpn needs an elevated prompt (Run as administrator) and wintun.dll from wintun.net beside mse-vpn.exe; if the name is in use by another session, pick another with --tun";
/// What to check when the device cannot be created.
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
const HINT: &str =
    "this operating system is not supported: mse-vpn runs on Linux, macOS and Windows";

/// An open TUN device; packets are raw IPv4/IPv6 datagrams without a header (macOS's 4-byte
/// utun protocol header is added and removed by the `tun` crate).
pub struct Tun {
    dev: tun::AsyncDevice,
    name: String,
}

impl Tun {
    /// Creates the TUN device `name` (it disappears, with its routes, when this is dropped).
    pub fn create(name: &str, mtu: u16) -> Result<Tun, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).mtu(mtu).layer(tun::Layer::L3);
        // Configuration (addresses, up, routes) is done by the platform crate.
        #[cfg(target_os = "linux")]
        config.platform_config(|p| {
            p.ensure_root_privileges(false);
        });
        // utun carries a 4-byte protocol family header on every packet: the crate strips it on
        // reads and adds it on writes. It adds no routes of its own.
        #[cfg(target_os = "macos")]
        config.platform_config(|p| {
            p.packet_information(true).enable_routing(false);
        });
        // wintun.dll is loaded from the executable's directory (then the DLL search path).
        #[cfg(windows)]
        config.platform_config(|p| {
            if let Some(dll) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("wintun.dll")))
                .filter(|dll| dll.is_file())
            {
                p.wintun_file(dll);
            }
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
