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
    /// The TUN device made in an app's own network namespace (`mse-vpn run` without root)
    /// could not be taken over.
    #[error("cannot use the TUN device {name} of the app's namespace: {source}")]
    Adopt {
        /// Its name inside the namespace.
        name: String,
        /// The underlying error.
        #[source]
        source: tun::Error,
    },
}

/// What a failed read or write on the TUN means for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The device is gone (deleted, or the descriptor detached from it): the session ends.
    Gone,
    /// A passing condition (no buffer space, the link set down for a moment, a packet the
    /// device refuses): the packet is dropped and counted, the session goes on.
    Transient,
}

/// `errno` values that mean the device is gone.
#[cfg(target_os = "linux")]
const GONE: &[i32] = &[
    nix::libc::EBADFD,
    nix::libc::EBADF,
    nix::libc::ENODEV,
    nix::libc::ENXIO,
];
/// `errno` values that mean the device is gone.
#[cfg(all(unix, not(target_os = "linux")))]
const GONE: &[i32] = &[nix::libc::EBADF, nix::libc::ENODEV, nix::libc::ENXIO];
/// `errno` values that mean the device is gone.
#[cfg(not(unix))]
const GONE: &[i32] = &[];

impl Fault {
    /// Classifies a TUN read or write error. Only a gone device is fatal: `ENOBUFS`,
    /// `ENOMEM`, `EIO` (Linux's answer while the link is down), `EINVAL` / `EMSGSIZE` (one
    /// packet the device refuses) and anything unknown are transient.
    pub fn of(e: &io::Error) -> Fault {
        if e.raw_os_error().is_some_and(|code| GONE.contains(&code)) {
            return Fault::Gone;
        }
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotFound => Fault::Gone,
            _ => Fault::Transient,
        }
    }
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

/// An open TUN device; packets are raw IPv4/IPv6 datagrams (macOS's 4-byte utun protocol
/// header is added and removed by the `tun` crate). On Linux each packet is preceded by a
/// virtio-net header of [`Tun::header_len`] bytes, with checksum offload when the kernel
/// accepts it ([`Tun::checksum_offload`]).
pub struct Tun {
    dev: tun::AsyncDevice,
    name: String,
    header_len: usize,
    checksum_offload: bool,
}

/// The size of `struct virtio_net_hdr` (linux/virtio_net.h), the TUN's default header size.
pub const VNET_HDR_LEN: usize = 10;

impl Tun {
    /// Creates the TUN device `name` (it disappears, with its routes, when this is dropped).
    pub fn create(name: &str, mtu: u16) -> Result<Tun, TunError> {
        #[cfg(target_os = "linux")]
        {
            // A virtio-net header on each packet, for checksum offload; a kernel that refuses
            // the header gets a plain device.
            if let Ok(tun) = Tun::open(name, mtu, true) {
                return Ok(tun);
            }
        }
        Tun::open(name, mtu, false)
    }

    /// Takes over a TUN device created elsewhere: `fd` is its open descriptor (the one an
    /// app's own network namespace passed over, `mse-vpn run` without root), `name` its name
    /// there, `vnet` whether it was attached with virtio-net headers. Nothing is configured:
    /// its addresses and routes were set up where it lives.
    #[cfg(target_os = "linux")]
    pub fn from_fd(
        fd: std::os::fd::OwnedFd,
        name: &str,
        mtu: u16,
        vnet: bool,
    ) -> Result<Tun, TunError> {
        use std::os::fd::IntoRawFd;
        let mut config = tun::Configuration::default();
        config
            .raw_fd(fd.into_raw_fd())
            .close_fd_on_drop(true)
            .tun_name(name)
            .mtu(mtu)
            .layer(tun::Layer::L3);
        config.platform_config(|p| {
            p.ensure_root_privileges(false);
        });
        let dev = tun::create_as_async(&config).map_err(|source| TunError::Adopt {
            name: name.to_owned(),
            source,
        })?;
        Ok(Tun::wrap(dev, name, vnet))
    }

    fn open(name: &str, mtu: u16, vnet: bool) -> Result<Tun, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).mtu(mtu).layer(tun::Layer::L3);
        // Configuration (addresses, up, routes) is done by the platform crate.
        #[cfg(target_os = "linux")]
        config.platform_config(|p| {
            p.ensure_root_privileges(false).vnet_hdr(vnet);
        });
        // utun carries a 4-byte protocol family header on every packet: the crate strips it on
        // reads and adds it on writes. It adds no routes of its own.
        #[cfg(target_os = "macos")]
        config.platform_config(|p| {
            p.packet_information(true).enable_routing(false);
        });
        // wintun.dll is loaded from the executable's directory (then the DLL search path). The
        // adapter's GUID is fixed per name: Windows then sees the same network every run (a
        // new GUID is a new "Unidentified network" on the Public firewall profile each time).
        #[cfg(windows)]
        config.platform_config(|p| {
            p.device_guid(mse_vpn_platform::adapter_guid(name));
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
        Ok(Tun::wrap(dev, name, vnet))
    }

    /// The device `dev` named `name`, with the virtio-net header when `vnet` (and checksum
    /// offload when the kernel takes it).
    fn wrap(dev: tun::AsyncDevice, name: &str, vnet: bool) -> Tun {
        let checksum_offload = vnet && offload(&dev);
        Tun {
            dev,
            name: name.to_owned(),
            header_len: if vnet { VNET_HDR_LEN } else { 0 },
            checksum_offload,
        }
    }

    /// Bytes of header in front of every packet read or written (the virtio-net header).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The kernel leaves TCP checksums of packets that stay on this machine to nobody: it
    /// hands ours over unverified and takes ours marked "checksum needed" (see the engine's
    /// `checksum_offload`).
    pub fn checksum_offload(&self) -> bool {
        self.checksum_offload
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

/// Turns on checksum offload; false (software checksums) if the kernel refuses.
#[cfg(target_os = "linux")]
fn offload(dev: &tun::AsyncDevice) -> bool {
    match mse_vpn_platform::sys::tun_checksum_offload(&**dev) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("TUN checksum offload refused ({e}): checksums in software");
            false
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn offload(_dev: &tun::AsyncDevice) -> bool {
    false
}

/// Where the driver reads and writes packets: the TUN device, or a test's queues. Each
/// packet has the TUN's header (`EngineConfig::tun`) in front.
pub trait PacketIo: Send + Sync + 'static {
    /// Reads one packet into `buf`.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes one packet.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

impl PacketIo for Tun {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        Tun::recv(self, buf)
    }

    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        Tun::send(self, packet)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_device_is_fatal() {
        let os = io::Error::from_raw_os_error;
        for code in [
            nix::libc::ENOBUFS,
            nix::libc::ENOMEM,
            nix::libc::EIO,
            nix::libc::EINVAL,
        ] {
            assert_eq!(Fault::of(&os(code)), Fault::Transient, "errno {code}");
        }
        for code in [nix::libc::EBADF, nix::libc::ENODEV, nix::libc::ENXIO] {
            assert_eq!(Fault::of(&os(code)), Fault::Gone, "errno {code}");
        }
        #[cfg(target_os = "linux")]
        assert_eq!(Fault::of(&os(nix::libc::EBADFD)), Fault::Gone);
        assert_eq!(
            Fault::of(&io::Error::from(io::ErrorKind::BrokenPipe)),
            Fault::Gone
        );
        assert_eq!(
            Fault::of(&io::Error::other("something else")),
            Fault::Transient
        );
    }
}
