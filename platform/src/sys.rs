//! The Unix system calls of mse-vpn that need `unsafe`: the one such file outside Windows'
//! `win32.rs` and `win32net.rs`. Three things live here: glibc's allocator tuning (and
//! trimming), the TUN device's ioctls (offload; creating one in the rootless mode's
//! namespace), and the descriptor passing of that mode (`SCM_RIGHTS`, an inherited socket).
//! Each is wrapped in a safe function.
//!
//! **Memory.** Each TCP flow owns receive and send ring buffers of a few hundred KiB. An idle flow touches
//! only the first pages of them, so they cost little resident memory *if* they come straight
//! from `mmap` (zero pages, mapped on first touch). glibc's malloc raises its mmap threshold
//! dynamically after the first large free, then serves such blocks from the heap, where
//! `calloc` must write zeros over the whole block: every idle flow would then cost its full
//! buffer size in resident memory (measured: 3 GB for 10,000 idle flows). Pinning the
//! threshold keeps large buffers on mmap.

#![allow(unsafe_code)]

/// Pins glibc's mmap threshold at `bytes` (disabling its dynamic adjustment). A no-op where
/// the C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn pin_mmap_threshold(bytes: usize) -> bool {
    set_mallopt(libc::M_MMAP_THRESHOLD, bytes)
}

/// Sets glibc's allocator parameter `param` to `bytes`; false if it does not fit or glibc
/// refuses it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mallopt(param: libc::c_int, bytes: usize) -> bool {
    let Ok(value) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt only changes allocator parameters; it takes plain integers, touches no
    // memory of ours, and is safe to call at any time from any thread (glibc takes its arena
    // lock). It returns 1 on success, 0 on error.
    unsafe { libc::mallopt(param, value) == 1 }
}

/// See the Linux/glibc version.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn pin_mmap_threshold(_bytes: usize) -> bool {
    false
}

/// Lets glibc keep up to `bytes` of free memory at the top of each heap instead of giving it
/// back at once (`M_TRIM_THRESHOLD`; pinning the mmap threshold leaves it at 128 KiB). With
/// the default, a bulk transfer's buffers shrank and regrew the heap over and over: 15,000
/// page faults per GB forwarded and about a tenth of mse-vpn's CPU. Memory freed when flows
/// close is still given back, by [`release_free_memory`]. A no-op where the C library is not
/// glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn pin_trim_threshold(bytes: usize) -> bool {
    set_mallopt(libc::M_TRIM_THRESHOLD, bytes)
}

/// See the Linux/glibc version.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn pin_trim_threshold(_bytes: usize) -> bool {
    false
}

/// Gives the allocator's free memory back to the system. glibc returns freed memory on its
/// own only from the top of its heap: after a burst (50 paused downloads held 250 MB of
/// channel data) the process kept about 210 MB that was free but stranded below live
/// allocations. `malloc_trim(0)` releases every free page of every arena (`MADV_DONTNEED`),
/// at the cost of a walk over the free lists. Returns whether memory was released. A no-op
/// where the C library is not glibc (the allocators of macOS and Windows return free pages
/// themselves).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes a plain integer (the bytes to keep at the heap's top), touches
    // no memory of ours, and only walks glibc's own free lists under its arena locks; it is
    // safe to call at any time from any thread. It returns 1 if memory was released.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// See the Linux/glibc version.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Checksum offload on a TUN device opened with `IFF_VNET_HDR` (`TUNSETOFFLOAD` with
/// `TUN_F_CSUM`): the kernel then hands over packets whose TCP checksum it did not compute
/// (marked in their virtio-net header, `VIRTIO_NET_HDR_F_NEEDS_CSUM`), and accepts packets
/// marked the same way from us, so neither side checksums data that never leaves the machine
/// (a packet the kernel forwards elsewhere gets its checksum filled in then, by the stack or
/// the NIC, as for any `CHECKSUM_PARTIAL` packet).
#[cfg(target_os = "linux")]
pub fn tun_checksum_offload(dev: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    /// `_IOW('T', 208, unsigned int)` from linux/if_tun.h.
    const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    /// `TUN_F_CSUM` from linux/if_tun.h.
    const TUN_F_CSUM: libc::c_ulong = 0x01;
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an integer of flags), not as a
    // pointer, so no memory of ours is read or written; the descriptor stays open for the
    // call's duration because `dev`, which owns it, is borrowed. An fd that is not a TUN
    // device fails with ENOTTY/EINVAL, reported as an error.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), TUNSETOFFLOAD as _, TUN_F_CSUM) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches the freshly opened `/dev/net/tun` descriptor `dev` to a new layer-3 TUN device
/// `name` (`TUNSETIFF` with `IFF_TUN | IFF_NO_PI`, and `IFF_VNET_HDR` when `vnet`: each
/// packet then carries the virtio-net header mse-vpn's TUN reader expects). Needs
/// `CAP_NET_ADMIN` in the user namespace that owns the caller's network namespace.
#[cfg(target_os = "linux")]
pub fn tun_set_iff(dev: &impl std::os::fd::AsRawFd, name: &str, vnet: bool) -> std::io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers, socket
    // addresses and a pointer) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet {
        flags |= libc::IFF_VNET_HDR;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, and `req` is one, alive and
    // exclusively borrowed for the call; the name is NUL-terminated (zeroed above, shorter
    // than IFNAMSIZ). The descriptor stays open for the call because `dev` owns it and is
    // borrowed. A descriptor that is not a TUN clone device fails with an errno.
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receives one message on the Unix socket `sock` into `buf`, with the one descriptor it may
/// carry (`SCM_RIGHTS`, received close-on-exec). Returns the message's length (0: the peer
/// closed its end) and the descriptor.
#[cfg(target_os = "linux")]
pub fn recv_with_fd(
    sock: &impl std::os::fd::AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in this process for this message
                // (SCM_RIGHTS): it is open, and nothing else knows or owns it. Extra ones
                // are owned too, and so closed when dropped.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, fd))
}

/// Takes ownership of descriptor `raw`, inherited from the parent process (the number came
/// in the environment). Fails unless it is an open socket.
#[cfg(target_os = "linux")]
pub fn adopt_inherited_socket(raw: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    if raw < 3 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `raw` is only borrowed for the fstat below, which fails with EBADF (no harm)
    // if it is not open; no ownership is taken yet.
    let st = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(raw) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `raw` is an open socket that the parent left to this process for this purpose
    // (the helper runs single-threaded and adopts it once, first thing): nothing else in
    // this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Lets descriptor `fd` (close-on-exec in this process) be inherited by the program `cmd`
/// runs: the flag is cleared in the child only, between fork and exec, so no other child
/// started meanwhile by another thread inherits it.
#[cfg(target_os = "linux")]
pub fn inherit_fd(cmd: &mut std::process::Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl(2),
    // which is async-signal-safe; it allocates nothing and takes no lock. `fd` is open in the
    // parent for as long as `cmd` can be spawned (the caller keeps it), hence in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Puts SIGPIPE back to its default action. Rust's runtime ignores it in every Rust program,
/// and an ignored signal stays ignored across `exec`: a program this process execs directly
/// (the rootless mode's app) would get EPIPE where it expects to die quietly (`yes | head`).
#[cfg(target_os = "linux")]
pub fn default_sigpipe() -> std::io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: the default action runs no code of ours, so no handler can run at a point where
    // only async-signal-safe calls are allowed; the previous action is dropped unused.
    unsafe { sigaction(Signal::SIGPIPE, &default) }
        .map(drop)
        .map_err(std::io::Error::from)
}
