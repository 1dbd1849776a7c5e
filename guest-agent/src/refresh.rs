//! Making a restored clone unique: every clone of one snapshot wakes with
//! the same random-number-generator state and a clock stopped at snapshot
//! time. The host sends fresh entropy and its clock; the agent mixes the
//! entropy into the kernel's pool, forces a reseed, and sets the clock.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: _IO('R', 0x07).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` followed by the entropy bytes.
fn pool_info(entropy: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + entropy.len());
    buf.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    buf.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    buf.extend_from_slice(entropy);
    // The kernel reads the buffer as __u32 words.
    buf.resize(8 + entropy.len().div_ceil(4) * 4, 0);
    buf
}

/// Credits `entropy` to the kernel's pool and reseeds the CRNG, then sets
/// CLOCK_REALTIME to `realtime_ns`. Needs CAP_SYS_ADMIN and CAP_SYS_TIME
/// (the agent is PID 1 as root).
pub fn apply(entropy: &[u8], realtime_ns: u64) -> Result<(), String> {
    if entropy.is_empty() || entropy.len() > 4096 {
        return Err(format!(
            "entropy must be 1 to 4096 bytes, got {}",
            entropy.len()
        ));
    }
    let f = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    let info = pool_info(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and buf_size bytes
    // after it; `info` holds exactly that, and outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
    if r != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    let ts = nix::sys::time::TimeSpec::new(
        (realtime_ns / 1_000_000_000) as libc::time_t,
        (realtime_ns % 1_000_000_000) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("clock_settime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let b = pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(i32::from_ne_bytes(b[0..4].try_into().unwrap()), 40);
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), 5);
        assert_eq!(&b[8..13], &[1, 2, 3, 4, 5]);
        assert_eq!(b.len(), 16);
    }

    #[test]
    fn refuses_bad_entropy_sizes() {
        assert!(apply(&[], 0).is_err());
        assert!(apply(&[0; 5000], 0).is_err());
    }
}
