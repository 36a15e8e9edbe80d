//! The process's open-file limit, and a connection cap that stays under it: each connection is one file
//! descriptor, and the database, images and models need some too. Hitting the limit would make `accept`
//! fail for everyone (and the database with it), so the cap is kept below it.

/// Descriptors kept free of connections for the database, image files, models, logs and the runtime.
pub const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard one (the soft default, often 1024, is far below what a
/// server needs) and returns the soft limit now in force.
pub fn raise_to_hard() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `setrlimit` reads one `rlimit` through a valid pointer to a local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// The connection cap for `files` open files: `configured`, lowered to leave [`RESERVED`] descriptors (or,
/// under a tiny limit, half of them) for everything else.
pub fn connection_cap(configured: usize, files: u64) -> usize {
    let room = files.saturating_sub(RESERVED).max(files / 2).max(1);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_other_files() {
        assert_eq!(connection_cap(1024, 1_048_576), 1024);
        assert_eq!(connection_cap(1024, 1024), 768);
        assert_eq!(connection_cap(1024, 300), 150);
        assert_eq!(connection_cap(64, 20_000), 64);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let files = raise_to_hard().expect("getrlimit");
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(files, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
