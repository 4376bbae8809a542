//! Facts about the machine and the process's limits: the CPUs corecast may run on, the
//! open-file limit (and raising it), and how much locked memory the executors need.
//!
//! A leaf: it depends on nothing else in the crate. `main` reads a [`Machine`] once and
//! hands it to [`crate::config::Config::load`], which derives its defaults from the plain
//! values; `shard` places executors on [`usable_cpus`] and `startup` checks the
//! locked-memory limit against [`IO_MEMORY_BYTES`].

/// glommio's DMA buffer arena per executor. TCP never uses it, and glommio registers it
/// with three rings against RLIMIT_MEMLOCK, so it is kept at glommio's minimum.
pub const IO_MEMORY_BYTES: usize = 64 << 10;

/// glommio refuses to create an executor below this `RLIMIT_MEMLOCK` (its reactor check).
pub const MIN_MEMLOCK_BYTES: u64 = 512 << 10;

/// The machine facts the configuration's defaults depend on, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// How many CPUs this process may run on (at least 1).
    pub usable_cpus: usize,
    /// The open-file hard limit, to which [`raise_nofile_limit`] raises the soft limit.
    pub nofile_hard_limit: u64,
}

impl Machine {
    /// Reads the facts of the machine this process runs on.
    pub fn detect() -> Machine {
        Machine {
            usable_cpus: usable_cpus().len().max(1),
            nofile_hard_limit: nofile_limit().1,
        }
    }
}

/// CPUs this process may run on: its affinity mask, restricted to online CPUs.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the one we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .map(|s| parse_cpu_list(s.trim()));
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| !ok || unsafe { libc::CPU_ISSET(cpu, &set) })
        .filter(|cpu| online.as_ref().is_none_or(|o| o.contains(cpu)))
        .take(if ok { usize::MAX } else { 1 })
        .collect()
}

/// Parses a kernel CPU list such as `0-3,6,8-9`.
fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|x| x.trim().parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => cpus.extend(a..=b),
            _ => {}
        }
    }
    cpus
}

/// `(soft, hard)` open-file limits.
pub fn nofile_limit() -> (u64, u64) {
    rlimit(libc::RLIMIT_NOFILE).unwrap_or((1024, 1024))
}

/// Raises the open-file soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let (soft, hard) = nofile_limit();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a valid, initialised struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return hard;
        }
    }
    soft
}

/// `(soft, hard)` locked-memory limits, `None` if they cannot be read. Either may be
/// `libc::RLIM_INFINITY`.
pub fn memlock_limit() -> Option<(u64, u64)> {
    rlimit(libc::RLIMIT_MEMLOCK)
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    (unsafe { libc::getrlimit(resource, &mut lim) } == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-3,7"), vec![0, 2, 3, 7]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
    }

    #[test]
    fn this_process_has_at_least_one_usable_cpu() {
        assert!(!usable_cpus().is_empty());
        assert_eq!(Machine::detect().usable_cpus, usable_cpus().len());
    }

    #[test]
    fn the_open_file_soft_limit_never_exceeds_the_hard_limit() {
        let (soft, hard) = nofile_limit();
        assert!(soft <= hard, "{soft} > {hard}");
        assert_eq!(Machine::detect().nofile_hard_limit, hard);
    }
}
