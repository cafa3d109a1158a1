//! Process memory tuning: the one file of mse-vpn with `unsafe` code.
//!
//! Each TCP flow owns receive and send ring buffers of a few hundred KiB. An idle flow touches
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
