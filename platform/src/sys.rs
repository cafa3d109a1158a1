//! The Unix system calls of mse-vpn that need `unsafe`: the one such file outside Windows'
//! `win32.rs` and `win32net.rs`. Two things live here: glibc's allocator tuning (and trimming), and the TUN
//! device's offload ioctl. Each is wrapped in a safe function.
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
    let Ok(value) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt only changes allocator parameters; it takes plain integers, touches no
    // memory of ours, and is safe to call at any time from any thread (glibc takes its arena
    // lock). It returns 1 on success, 0 on error.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
}

/// See the Linux/glibc version.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn pin_mmap_threshold(_bytes: usize) -> bool {
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
