//! How the `[[workers]]` entries become worker threads on this machine: `count` and `threads` may be numbers
//! or `"auto"`, resolved here against the cores the process may use, so that a config uses every core without
//! oversubscribing them.
//!
//! Small graphs barely speed up with more intra-op threads (two one-thread workers ran 2.3× the jobs of one
//! two-thread worker on the default model), while large graphs at large sizes do, and every worker holds its
//! own sessions and activations. So the rules are:
//!
//! * a CPU entry with `count = "auto"` fills the cores left by the entries with fixed sizes: one worker per
//!   core with `threads = "auto"` (1 thread each), or `cores / threads` workers with a fixed `threads`;
//! * CPU entries with `threads = "auto"` and a fixed `count` share the cores left by the fixed entries evenly
//!   (at least one each);
//! * a `cuda:N` entry's `"auto"` count is 1 and its `"auto"` threads 1: the GPU does the work, the CPU threads
//!   only run the few nodes the CUDA provider does not take, and spinning threads would take cores from the
//!   HTTP server and the CPU workers.

use serde::{Deserialize, Deserializer};

use super::pool::WorkerSpec;
use crate::engine::runtime::Device;

/// A number of threads or workers: fixed, or decided from the machine's cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Amount {
    /// Decided by [`resolve`].
    #[default]
    Auto,
    /// Exactly this many (at least 1).
    Fixed(usize),
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer).map_err(|_| serde::de::Error::custom("expected a number or \"auto\""))? {
            Raw::Number(n) if n >= 1 => Ok(Amount::Fixed(n as usize)),
            Raw::Number(n) => Err(serde::de::Error::custom(format!("{n}: must be at least 1 (or \"auto\")"))),
            Raw::Text(t) if t.eq_ignore_ascii_case("auto") => Ok(Amount::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("`{t}`: expected a number or \"auto\""))),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Auto => write!(f, "auto"),
            Amount::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// One `[[workers]]` entry as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerEntry {
    /// Where its sessions run.
    pub device: Device,
    /// Workers made from this entry.
    pub count: Amount,
    /// Intra-op threads of each.
    pub threads: Amount,
    /// Images one shared denoiser call may carry.
    pub max_batch: usize,
}

/// The cores this process may use (its CPU affinity and cgroup quota included), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The worker threads `entries` make on a machine with `cores` usable cores, in entry order. Fails when the
/// entries leave `"auto"` ambiguous: at most one CPU entry may have `count = "auto"`, and then the other CPU
/// entries need a fixed `threads`.
pub fn resolve(entries: &[WorkerEntry], cores: usize) -> Result<Vec<WorkerSpec>, String> {
    let cores = cores.max(1);
    let is_cpu = |e: &&WorkerEntry| e.device == Device::Cpu;
    let fixed_cores: usize = entries
        .iter()
        .filter(is_cpu)
        .filter_map(|e| match (e.count, e.threads) {
            (Amount::Fixed(n), Amount::Fixed(t)) => Some(n * t),
            _ => None,
        })
        .sum();
    let left = cores.saturating_sub(fixed_cores).max(1);
    let auto_count: Vec<&WorkerEntry> = entries.iter().filter(is_cpu).filter(|e| e.count == Amount::Auto).collect();
    let auto_threads_fixed_count: usize = entries
        .iter()
        .filter(is_cpu)
        .filter_map(|e| match (e.count, e.threads) {
            (Amount::Fixed(n), Amount::Auto) => Some(n),
            _ => None,
        })
        .sum();
    if auto_count.len() > 1 {
        return Err("at most one cpu [[workers]] entry may have count = \"auto\"".into());
    }
    if !auto_count.is_empty() && auto_threads_fixed_count > 0 {
        return Err(
            "with count = \"auto\" on a cpu [[workers]] entry, the other cpu entries need a fixed threads".into()
        );
    }
    // Threads of the CPU workers sized by `threads = "auto"` with a fixed count: an even share of what is left.
    let mut shares = (0..auto_threads_fixed_count).map(|i| {
        (left / auto_threads_fixed_count.max(1) + usize::from(i < left % auto_threads_fixed_count.max(1))).max(1)
    });
    let mut specs = Vec::new();
    for entry in entries {
        let (count, threads): (usize, Option<usize>) = match (entry.device, entry.count, entry.threads) {
            (Device::Cuda(_), count, threads) => (fixed_or(count, 1), Some(fixed_or(threads, 1))),
            (Device::Cpu, Amount::Auto, Amount::Auto) => (left, Some(1)),
            (Device::Cpu, Amount::Auto, Amount::Fixed(t)) => ((left / t).max(1), Some(t)),
            (Device::Cpu, Amount::Fixed(n), Amount::Fixed(t)) => (n, Some(t)),
            (Device::Cpu, Amount::Fixed(n), Amount::Auto) => (n, None),
        };
        for _ in 0..count {
            let threads = match threads {
                Some(t) => t,
                None => shares.next().unwrap_or(1),
            };
            specs.push(WorkerSpec { device: entry.device, threads, max_batch: entry.max_batch });
        }
    }
    Ok(specs)
}

fn fixed_or(amount: Amount, auto: usize) -> usize {
    match amount {
        Amount::Fixed(n) => n,
        Amount::Auto => auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: Amount = Amount::Auto;

    fn cpu(count: Amount, threads: Amount) -> WorkerEntry {
        WorkerEntry { device: Device::Cpu, count, threads, max_batch: 4 }
    }

    fn threads_of(entries: &[WorkerEntry], cores: usize) -> Vec<usize> {
        resolve(entries, cores).unwrap().iter().map(|s| s.threads).collect()
    }

    #[test]
    fn auto_count_and_threads_give_one_single_thread_worker_per_core() {
        assert_eq!(threads_of(&[cpu(AUTO, AUTO)], 2), [1, 1]);
        assert_eq!(threads_of(&[cpu(AUTO, AUTO)], 1), [1]);
        assert_eq!(threads_of(&[cpu(AUTO, AUTO)], 8), [1; 8]);
    }

    #[test]
    fn auto_count_with_fixed_threads_fills_the_cores() {
        assert_eq!(threads_of(&[cpu(AUTO, Amount::Fixed(2))], 8), [2, 2, 2, 2]);
        assert_eq!(threads_of(&[cpu(AUTO, Amount::Fixed(3))], 8), [3, 3]);
        assert_eq!(threads_of(&[cpu(AUTO, Amount::Fixed(4))], 2), [4], "at least one worker");
    }

    #[test]
    fn auto_threads_share_the_cores_left_evenly() {
        assert_eq!(threads_of(&[cpu(Amount::Fixed(1), AUTO)], 16), [16]);
        assert_eq!(threads_of(&[cpu(Amount::Fixed(3), AUTO)], 8), [3, 3, 2]);
        assert_eq!(threads_of(&[cpu(Amount::Fixed(1), Amount::Fixed(2)), cpu(Amount::Fixed(2), AUTO)], 8), [2, 3, 3]);
        assert_eq!(threads_of(&[cpu(Amount::Fixed(4), AUTO)], 2), [1, 1, 1, 1], "at least one thread each");
        assert_eq!(threads_of(&[cpu(Amount::Fixed(1), Amount::Fixed(8)), cpu(Amount::Fixed(1), AUTO)], 4), [8, 1]);
    }

    #[test]
    fn fixed_entries_are_kept_as_written() {
        assert_eq!(threads_of(&[cpu(Amount::Fixed(2), Amount::Fixed(3))], 1), [3, 3]);
    }

    #[test]
    fn gpu_workers_get_one_thread_and_do_not_take_cores() {
        let gpu = WorkerEntry { device: Device::Cuda(0), count: AUTO, threads: AUTO, max_batch: 4 };
        let specs = resolve(&[gpu, cpu(AUTO, AUTO)], 4).unwrap();
        assert_eq!(specs[0], WorkerSpec { device: Device::Cuda(0), threads: 1, max_batch: 4 });
        assert_eq!(specs.len(), 5);
        assert!(specs[1..].iter().all(|s| s.device == Device::Cpu && s.threads == 1));
        let two =
            WorkerEntry { device: Device::Cuda(1), count: Amount::Fixed(2), threads: Amount::Fixed(4), max_batch: 4 };
        assert_eq!(threads_of(&[two], 2), [4, 4]);
    }

    #[test]
    fn ambiguous_auto_entries_are_refused() {
        let err = resolve(&[cpu(AUTO, AUTO), cpu(AUTO, Amount::Fixed(1))], 4).unwrap_err();
        assert!(err.contains("at most one"), "{err}");
        let err = resolve(&[cpu(AUTO, AUTO), cpu(Amount::Fixed(1), AUTO)], 4).unwrap_err();
        assert!(err.contains("fixed threads"), "{err}");
    }

    #[test]
    fn amounts_parse_from_numbers_and_auto() {
        #[derive(Deserialize)]
        struct T {
            a: Amount,
        }
        let parse = |text: &str| toml::from_str::<T>(text).map(|t| t.a);
        assert_eq!(parse("a = 3").unwrap(), Amount::Fixed(3));
        assert_eq!(parse("a = \"auto\"").unwrap(), Amount::Auto);
        assert_eq!(parse("a = \"AUTO\"").unwrap(), Amount::Auto);
        assert!(parse("a = 0").unwrap_err().to_string().contains("at least 1"));
        assert!(parse("a = \"many\"").unwrap_err().to_string().contains("auto"));
        assert!(parse("a = 1.5").is_err());
    }
}
