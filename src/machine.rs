//! Facts about the machine and the process's limits: the CPUs corecast may run on, the
//! open-file limit (and raising it), and how much locked memory the executors need
//! ([`plan_rings`]).
//!
//! A leaf: it depends on nothing else in the crate. `main` reads a [`Machine`] once and
//! hands it to [`crate::config::Config::load`], which derives its defaults from the plain
//! values; `executor` places executors on [`usable_cpus`] with the ring depth
//! [`plan_rings`] chose, and `startup` checks the locked-memory floor.
//!
//! What a shard locks (LINUX_ONLY.md#locked-memory-rlimit_memlock): glommio gives every
//! executor three io_uring rings (main, latency, poll), and the kernel charges each ring's
//! memory, the SQ/CQ rings and the SQE array, to RLIMIT_MEMLOCK unless the process has
//! CAP_IPC_LOCK ([`ring_locked_bytes`]). glommio also registers its 64 KiB DMA arena with
//! each ring (192 KiB a shard); TCP never uses it, so `executor` unregisters it as soon as
//! the executor exists, and it is charged only for that moment.

/// glommio's DMA buffer arena per executor. TCP never uses it, and glommio registers it
/// with three rings against RLIMIT_MEMLOCK, so it is kept at glommio's minimum.
pub const IO_MEMORY_BYTES: usize = 64 << 10;

/// io_uring instances glommio creates per executor (main, latency, poll).
pub const RINGS_PER_SHARD: u64 = 3;

/// Submission-queue depths corecast may give its rings, best first. Connection bursts arm
/// one poll each, and a reactor pass submits at most a ring's depth of them, so a deeper
/// ring takes a burst in fewer passes; a shallower one costs less locked memory. 64 is
/// where a ring's memory stops shrinking (one page for the rings, one for the SQEs).
pub const RING_DEPTHS: [usize; 5] = [1024, 512, 256, 128, 64];

/// Locked memory held for a moment while a shard's executor is created: glommio's DMA
/// arena registered with its three rings, before `executor` unregisters it. Executors are
/// created one at a time, so one such reserve covers all of them.
pub const TRANSIENT_LOCKED_BYTES: u64 = RINGS_PER_SHARD * IO_MEMORY_BYTES as u64;

/// Bytes the kernel charges to RLIMIT_MEMLOCK for one ring of `depth` entries, as Linux
/// 6.x sizes it: the rings region (a header of a few cache lines, `2 × depth` 16-byte
/// CQEs, a `depth`-entry index array) and the SQE array (`depth` × 64 bytes), each rounded
/// up to whole pages. The header is taken as 512 bytes, above its real size, so the
/// figure errs high.
pub fn ring_locked_bytes(depth: usize) -> u64 {
    let page = page_size();
    let round = |v: u64, to: u64| v.div_ceil(to) * to;
    let depth = depth as u64;
    let rings = round(round(512 + 2 * depth * 16, 64) + depth * 4, page);
    let sqes = round(depth * 64, page);
    rings + sqes
}

/// Locked memory one shard holds for as long as it runs: its three rings.
pub fn shard_locked_bytes(depth: usize) -> u64 {
    RINGS_PER_SHARD * ring_locked_bytes(depth)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// How many shards start and how deep their rings are, sized by the locked-memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPlan {
    /// Shards that start: the number asked for unless the limit cannot hold their rings
    /// even at the smallest depth.
    pub shards: usize,
    /// Entries per ring: the deepest of [`RING_DEPTHS`] whose rings fit for `shards`.
    pub ring_depth: usize,
    /// Locked memory per shard at that depth ([`shard_locked_bytes`]).
    pub locked_per_shard: u64,
    /// The limit the plan was sized by; `None` when nothing is charged (no limit, or
    /// CAP_IPC_LOCK).
    pub limit: Option<u64>,
}

/// Sizes the rings of `wanted` shards by `limit` (the soft RLIMIT_MEMLOCK in bytes, `None`
/// if the kernel charges nothing): the deepest rings whose total, plus the moment's
/// [`TRANSIENT_LOCKED_BYTES`], fits; if not even the smallest fits, as many shards as do
/// (at least one; below glommio's floor `startup` refuses first).
pub fn plan_rings(wanted: usize, limit: Option<u64>) -> RingPlan {
    let wanted = wanted.max(1);
    let Some(limit) = limit else {
        return RingPlan {
            shards: wanted,
            ring_depth: RING_DEPTHS[0],
            locked_per_shard: shard_locked_bytes(RING_DEPTHS[0]),
            limit: None,
        };
    };
    let room = limit.saturating_sub(TRANSIENT_LOCKED_BYTES);
    let fits = |depth: usize| wanted as u64 * shard_locked_bytes(depth) <= room;
    let smallest = RING_DEPTHS[RING_DEPTHS.len() - 1];
    let depth = RING_DEPTHS.into_iter().find(|&d| fits(d)).unwrap_or(smallest);
    let per_shard = shard_locked_bytes(depth);
    let shards = if fits(depth) {
        wanted
    } else {
        usize::try_from(room / per_shard).unwrap_or(usize::MAX).clamp(1, wanted)
    };
    RingPlan {
        shards,
        ring_depth: depth,
        locked_per_shard: per_shard,
        limit: Some(limit),
    }
}

/// The locked-memory limit the kernel will hold the rings to: the soft RLIMIT_MEMLOCK
/// after [`raise_memlock_limit`], or `None` when it charges nothing (an unlimited limit,
/// or CAP_IPC_LOCK in effect, as for root).
pub fn charged_memlock_limit() -> Option<u64> {
    charged(|(soft, _)| soft)
}

/// [`charged_memlock_limit`] as it will be once [`raise_memlock_limit`] has run (the hard
/// limit), without raising anything: what `corecast check` plans with.
pub fn charged_memlock_limit_after_raise() -> Option<u64> {
    charged(|(_, hard)| hard)
}

/// The RLIMIT_MEMLOCK figure `pick` takes (soft or hard), or `None` when the kernel
/// charges nothing.
fn charged(pick: fn((u64, u64)) -> u64) -> Option<u64> {
    if has_ipc_lock() {
        return None;
    }
    memlock_limit().map(pick).filter(|&limit| limit != libc::RLIM_INFINITY)
}

/// Whether CAP_IPC_LOCK is in this process's effective set (then io_uring charges no
/// locked memory).
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Raises the locked-memory soft limit to the hard limit, as [`raise_nofile_limit`] does
/// for open files (anyone may); returns the new soft limit.
pub fn raise_memlock_limit() -> Option<u64> {
    let (soft, hard) = memlock_limit()?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a valid, initialised struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } == 0 {
            return Some(hard);
        }
    }
    Some(soft)
}

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
    fn a_ring_costs_a_page_of_rings_and_a_page_of_sqes_at_64_entries_and_26_pages_at_1024() {
        if page_size() != 4096 {
            return;
        }
        assert_eq!(ring_locked_bytes(64), 2 * 4096);
        assert_eq!(ring_locked_bytes(128), 4 * 4096);
        assert_eq!(ring_locked_bytes(256), 7 * 4096);
        assert_eq!(ring_locked_bytes(1024), 26 * 4096);
        assert_eq!(shard_locked_bytes(128), 48 << 10);
    }

    #[test]
    fn the_default_8_mib_limit_holds_128_shards_at_a_smaller_ring_depth() {
        if page_size() != 4096 {
            return;
        }
        let limit = Some(8 << 20);
        let few = plan_rings(16, limit);
        assert_eq!((few.shards, few.ring_depth), (16, 1024));
        let p64 = plan_rings(64, limit);
        assert_eq!((p64.shards, p64.ring_depth), (64, 256));
        let p128 = plan_rings(128, limit);
        assert_eq!(
            (p128.shards, p128.ring_depth, p128.locked_per_shard),
            (128, 128, 48 << 10)
        );
        assert!(128 * p128.locked_per_shard + TRANSIENT_LOCKED_BYTES <= 8 << 20);
        // Uncharged: everything at the deepest rings.
        let free = plan_rings(1024, None);
        assert_eq!((free.shards, free.ring_depth), (1024, 1024));
    }

    #[test]
    fn a_limit_too_small_for_every_shard_starts_as_many_as_fit_and_at_least_one() {
        if page_size() != 4096 {
            return;
        }
        let p = plan_rings(1024, Some(8 << 20));
        assert_eq!(p.ring_depth, 64);
        assert_eq!(p.shards, ((8 << 20) - TRANSIENT_LOCKED_BYTES as usize) / (24 << 10));
        assert!(p.shards as u64 * p.locked_per_shard + TRANSIENT_LOCKED_BYTES <= 8 << 20);
        assert_eq!(plan_rings(4, Some(100 << 10)).shards, 1);
    }

    #[test]
    fn the_open_file_soft_limit_never_exceeds_the_hard_limit() {
        let (soft, hard) = nofile_limit();
        assert!(soft <= hard, "{soft} > {hard}");
        assert_eq!(Machine::detect().nofile_hard_limit, hard);
    }
}
