//! CLOCK_BOOTTIME, the clock the kernel programs use (`bpf_ktime_get_boot_ns`) for event times
//! and grant expiry. It keeps counting across suspend, unlike CLOCK_MONOTONIC.

/// Nanoseconds on CLOCK_BOOTTIME now.
pub fn boottime_ns() -> Result<u64, std::io::Error> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(ts.tv_sec).map_err(std::io::Error::other)?;
    let nanos = u64::try_from(ts.tv_nsec).map_err(std::io::Error::other)?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// Nanoseconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Converts an absolute Unix time (ns) to CLOCK_BOOTTIME (ns), saturating at 0.
pub fn unix_to_boottime_ns(unix_ns: u64) -> Result<u64, std::io::Error> {
    let boot = boottime_ns()?;
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(std::io::Error::other)?;
    let now_unix = u64::try_from(now_unix.as_nanos()).map_err(std::io::Error::other)?;
    Ok((boot + unix_ns).saturating_sub(now_unix))
}

#[cfg(test)]
mod tests {
    #[test]
    fn boottime_advances() -> Result<(), std::io::Error> {
        let a = super::boottime_ns()?;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::boottime_ns()?;
        assert!(b > a);
        Ok(())
    }
}
