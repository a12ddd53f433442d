//! The GPUs a replica runs on (SPEC §15). A deployment that sets `gpu_memory_bytes` has each replica started on GPUs
//! of the node that have that memory free, seen by the runtime alone (`CUDA_VISIBLE_DEVICES`): two deployments on a
//! node with several GPUs do not both load onto the first one, as they would if each runtime saw them all.
//!
//! Free memory is the agent's latest GPU sample (what its heartbeats report), less what the replicas it pinned take
//! and the sample does not show yet (started after it, or not serving before it). The choice ([`choose`]) is a pure
//! function:
//! - a runtime that runs on a set number of GPUs (vLLM: its tensor × pipeline parallel size) gets that many, those
//!   with the most free memory, each holding an equal share of the replica;
//! - llama.cpp gets the GPU with the most free memory when it holds the replica alone, else the fewest GPUs, most
//!   free first, that hold it together (llama.cpp spreads the layers over the GPUs it sees);
//! - when nothing fits, the replica fails with the figures and its start is tried again with the supervision's
//!   backoff.
//!
//! A replica keeps its GPUs when its runtime is restarted (what the dead runtime held is its own, whatever a sample
//! taken before its death says) and gives them back when it stops: what it held counts as free at once, before a
//! sample shows it. A new revision that fits only in what an older revision of its deployment holds is told so
//! ([`Refused::older`]): the agent then stops the older one first, as on a node without room for both.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::Key;
use crate::gpu::GpuSample;

/// One GPU's free memory, as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub index: u32,
    pub bytes: u64,
}

/// The GPUs, by index in ascending order, for a replica of `needed` bytes: `count` of them when the runtime sets
/// it, else as few as hold it; a sentence with the figures when none do.
pub fn choose(free: &[Free], needed: u64, count: Option<u32>) -> Result<Vec<u32>, String> {
    let mut order: Vec<Free> = free.to_vec();
    order.sort_by_key(|gpu| (std::cmp::Reverse(gpu.bytes), gpu.index));
    let mut chosen: Vec<u32> = match count {
        Some(count) => {
            let wanted = usize::try_from(count).unwrap_or(usize::MAX);
            let share = needed.div_ceil(u64::from(count.max(1)));
            if order.len() < wanted {
                return Err(format!("the runtime runs on {count} GPUs and this node has {}", order.len()));
            }
            if order[..wanted].iter().any(|gpu| gpu.bytes < share) {
                return Err(format!(
                    "the runtime runs on {count} GPU{} with {} free each; this node has {}",
                    if count == 1 { "" } else { "s" },
                    gib(share),
                    describe(free)
                ));
            }
            order[..wanted].iter().map(|gpu| gpu.index).collect()
        }
        None => {
            let mut total = 0u64;
            let mut chosen = Vec::new();
            for gpu in &order {
                if total >= needed && !chosen.is_empty() {
                    break;
                }
                total = total.saturating_add(gpu.bytes);
                chosen.push(gpu.index);
            }
            if total < needed || chosen.is_empty() {
                return Err(format!(
                    "the replica needs {} of GPU memory; this node has {}",
                    gib(needed),
                    describe(free)
                ));
            }
            chosen
        }
    };
    chosen.sort_unstable();
    Ok(chosen)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn describe(free: &[Free]) -> String {
    if free.is_empty() {
        return "no GPU with known memory".to_owned();
    }
    let each: Vec<String> = free.iter().map(|gpu| format!("GPU {}: {} free", gpu.index, gib(gpu.bytes))).collect();
    each.join(", ")
}

/// Why a replica got no GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// A sentence with the figures.
    pub reason: String,
    /// It would fit in what older revisions of its deployment hold.
    pub older: bool,
}

/// The GPUs a replica was given, and the environment that shows the runtime those alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub indices: Vec<u32>,
    pub env: Vec<(&'static str, String)>,
}

impl Pinned {
    /// By UUID where the driver gave every chosen GPU one (the same GPU whatever order CUDA counts them in), else by
    /// index in PCI bus order, the order `nvidia-smi` and NVML number them.
    fn new(indices: Vec<u32>, gpus: &[Sampled]) -> Self {
        let uuids: Option<Vec<&str>> = indices
            .iter()
            .map(|index| gpus.iter().find(|gpu| gpu.index == *index).and_then(|gpu| gpu.uuid.as_deref()))
            .collect();
        let env = match uuids {
            Some(uuids) => vec![("CUDA_VISIBLE_DEVICES", uuids.join(","))],
            None => {
                let list: Vec<String> = indices.iter().map(u32::to_string).collect();
                vec![("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_owned()), ("CUDA_VISIBLE_DEVICES", list.join(","))]
            }
        };
        Pinned { indices, env }
    }
}

#[derive(Debug, Clone)]
struct Sampled {
    index: u32,
    uuid: Option<String>,
    /// `None` when the driver did not say.
    free: Option<u64>,
}

/// What a replica took.
#[derive(Debug, Clone)]
struct Claim {
    indices: Vec<u32>,
    share: u64,
    /// When its runtime began serving: a sample taken after that shows what it holds.
    ready_at: Option<Instant>,
}

/// What a stopped replica held and the latest sample may still show in use.
#[derive(Debug, Clone)]
struct Freed {
    indices: Vec<u32>,
    share: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Book {
    gpus: Vec<Sampled>,
    sampled_at: Option<Instant>,
    claims: HashMap<Key, Claim>,
    freed: Vec<Freed>,
}

impl Book {
    /// Each GPU's free memory now: the sample's, less what claims take that it does not show, plus what stopped
    /// replicas held that it still shows; the claims of `also_free` count as free. `None` when the driver did not
    /// report a GPU's memory.
    fn free(&self, also_free: impl Fn(&Key) -> bool) -> Option<Vec<Free>> {
        let sampled_at = self.sampled_at;
        self.gpus
            .iter()
            .map(|gpu| {
                let on = |indices: &[u32]| indices.contains(&gpu.index);
                let mut bytes = gpu.free?;
                for (key, claim) in &self.claims {
                    if on(&claim.indices) {
                        match (shown(claim, sampled_at), also_free(key)) {
                            (false, false) => bytes = bytes.saturating_sub(claim.share),
                            (true, true) => bytes = bytes.saturating_add(claim.share),
                            _ => {}
                        }
                    }
                }
                for freed in &self.freed {
                    if on(&freed.indices) && sampled_at.is_some_and(|sampled| sampled < freed.at) {
                        bytes = bytes.saturating_add(freed.share);
                    }
                }
                Some(Free { index: gpu.index, bytes })
            })
            .collect()
    }
}

/// The node's GPUs and what the replicas took of them; shared by the replica tasks.
#[derive(Debug, Default)]
pub struct Gpus {
    book: Mutex<Book>,
}

impl Gpus {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent's latest sample of its GPUs.
    pub fn sampled(&self, sample: &[GpuSample]) {
        let gpus = sample
            .iter()
            .map(|gpu| Sampled {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                free: gpu.memory_total_bytes.map(|total| total.saturating_sub(gpu.memory_used_bytes.unwrap_or(0))),
            })
            .collect();
        let mut book = self.book();
        let now = Instant::now();
        book.gpus = gpus;
        book.sampled_at = Some(now);
        book.freed.retain(|freed| freed.at > now);
    }

    /// Gives replica `key` GPUs for `needed` bytes (`count` of them when the runtime sets it), keeping those it
    /// has already.
    pub fn claim(&self, key: Key, needed: u64, count: Option<u32>) -> Result<Pinned, Refused> {
        let mut book = self.book();
        if let Some(claim) = book.claims.get(&key) {
            return Ok(Pinned::new(claim.indices.clone(), &book.gpus));
        }
        let Some(free) = book.free(|_| false) else {
            let reason = "the GPUs' free memory is unknown (the driver does not report it)".to_owned();
            return Err(Refused { reason, older: false });
        };
        let indices = match choose(&free, needed, count) {
            Ok(indices) => indices,
            Err(reason) => {
                let older = |other: &Key| other.0 == key.0 && other.1 != key.1;
                let older = book.claims.keys().any(older)
                    && book.free(older).is_some_and(|free| choose(&free, needed, count).is_ok());
                return Err(Refused { reason, older });
            }
        };
        let share = needed.div_ceil(indices.len().max(1) as u64);
        book.claims.insert(key, Claim { indices: indices.clone(), share, ready_at: None });
        Ok(Pinned::new(indices, &book.gpus))
    }

    /// Replica `key` serves: the next sample shows what it holds.
    pub fn ready(&self, key: Key) {
        if let Some(claim) = self.book().claims.get_mut(&key) {
            claim.ready_at.get_or_insert_with(Instant::now);
        }
    }

    /// Replica `key` stopped: its GPUs are free for others.
    pub fn release(&self, key: Key) {
        let mut book = self.book();
        if let Some(claim) = book.claims.remove(&key)
            && shown(&claim, book.sampled_at)
        {
            book.freed.push(Freed { indices: claim.indices, share: claim.share, at: Instant::now() });
        }
    }
}

/// Whether the sample taken at `sampled_at` shows the memory of `claim`'s runtime.
fn shown(claim: &Claim, sampled_at: Option<Instant>) -> bool {
    matches!((claim.ready_at, sampled_at), (Some(ready), Some(sampled)) if sampled >= ready)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::deploy) const GIB: u64 = 1 << 30;

    fn free(list: &[(u32, u64)]) -> Vec<Free> {
        list.iter().map(|&(index, gib)| Free { index, bytes: gib * GIB }).collect()
    }

    #[test]
    fn llama_cpp_takes_the_freest_gpu_or_the_fewest_that_hold_it_together() {
        let gpus = free(&[(0, 10), (1, 30), (2, 20)]);
        assert_eq!(choose(&gpus, 8 * GIB, None), Ok(vec![1]));
        assert_eq!(choose(&gpus, 30 * GIB, None), Ok(vec![1]));
        assert_eq!(choose(&gpus, 45 * GIB, None), Ok(vec![1, 2]));
        assert_eq!(choose(&gpus, 60 * GIB, None), Ok(vec![0, 1, 2]));
        let refused = choose(&gpus, 61 * GIB, None).expect_err("too big");
        assert_eq!(
            refused,
            "the replica needs 61.00 GiB of GPU memory; this node has GPU 0: 10.00 GiB free, GPU 1: 30.00 GiB free, \
             GPU 2: 20.00 GiB free"
        );
        // Equal GPUs: the lowest index first.
        assert_eq!(choose(&free(&[(3, 10), (1, 10)]), GIB, None), Ok(vec![1]));
        assert!(choose(&[], GIB, None).expect_err("no GPU").ends_with("no GPU with known memory"));
    }

    #[test]
    fn vllm_takes_its_parallel_size_of_gpus_each_holding_a_share() {
        let gpus = free(&[(0, 10), (1, 30), (2, 20), (3, 25)]);
        assert_eq!(choose(&gpus, 8 * GIB, Some(1)), Ok(vec![1]));
        assert_eq!(choose(&gpus, 40 * GIB, Some(2)), Ok(vec![1, 3]));
        assert_eq!(choose(&gpus, 60 * GIB, Some(3)), Ok(vec![1, 2, 3]));
        // One GPU does not hold it, even though all of them together would.
        let refused = choose(&gpus, 31 * GIB, Some(1)).expect_err("too big for one");
        assert!(refused.starts_with("the runtime runs on 1 GPU with 31.00 GiB free each;"), "{refused}");
        assert_eq!(choose(&gpus, GIB, Some(8)), Err("the runtime runs on 8 GPUs and this node has 4".to_owned()));
    }

    /// GPUs by `(index, total GiB, used GiB)`, each with the UUID `GPU-<index>`.
    pub(in crate::deploy) fn sample(list: &[(u32, u64, u64)]) -> Vec<GpuSample> {
        list.iter()
            .map(|&(index, total, used)| GpuSample {
                index,
                model: "GPU".into(),
                memory_total_bytes: Some(total * GIB),
                memory_used_bytes: Some(used * GIB),
                utilization: None,
                temperature_c: None,
                uuid: Some(format!("GPU-{index}")),
                ecc_uncorrected: None,
                xid: None,
                power_watts: None,
                throttle_reasons: None,
            })
            .collect()
    }

    fn key(n: u128) -> Key {
        (uuid::Uuid::from_u128(n), 1)
    }

    #[test]
    fn replicas_do_not_pile_onto_one_gpu_before_a_sample_shows_them() {
        let gpus = Gpus::default();
        gpus.sampled(&sample(&[(0, 80, 0), (1, 80, 10)]));
        let first = gpus.claim(key(1), 60 * GIB, Some(1)).expect("first");
        assert_eq!(first.indices, [0]);
        assert_eq!(first.env, [("CUDA_VISIBLE_DEVICES", "GPU-0".to_owned())]);
        // The first replica is not in any sample yet: the second goes to the other GPU, the third fits nowhere.
        assert_eq!(gpus.claim(key(2), 60 * GIB, Some(1)).expect("second").indices, [1]);
        assert!(gpus.claim(key(3), 30 * GIB, Some(1)).is_err());
        // A replica keeps its GPUs when its runtime starts again.
        assert_eq!(gpus.claim(key(1), 60 * GIB, Some(1)).expect("again").indices, [0]);

        // Serving, then sampled: the sample shows what they hold, and the claims count no more.
        gpus.ready(key(1));
        gpus.ready(key(2));
        gpus.sampled(&sample(&[(0, 80, 62), (1, 80, 71)]));
        let refused = gpus.claim(key(3), 30 * GIB, Some(1)).expect_err("nothing free");
        assert!(refused.reason.contains("GPU 0: 18.00 GiB free, GPU 1: 9.00 GiB free"), "{refused:?}");
        assert!(!refused.older);
        assert_eq!(gpus.claim(key(3), 15 * GIB, Some(1)).expect("fits").indices, [0]);

        // Stopped: what it held is free at once, before a sample shows it, and not counted twice after.
        gpus.release(key(1));
        gpus.release(key(3));
        assert_eq!(gpus.claim(key(4), 75 * GIB, None).expect("after release").indices, [0]);
        gpus.release(key(4));
        gpus.sampled(&sample(&[(0, 80, 2), (1, 80, 71)]));
        assert!(gpus.claim(key(5), 79 * GIB, Some(1)).is_err());
        assert_eq!(gpus.claim(key(5), 78 * GIB, Some(1)).expect("sampled free").indices, [0]);
    }

    #[test]
    fn a_new_revision_without_room_is_told_that_the_older_one_holds_it() {
        let gpus = Gpus::default();
        gpus.sampled(&sample(&[(0, 80, 0)]));
        let old = (uuid::Uuid::from_u128(1), 1);
        gpus.claim(old, 60 * GIB, Some(1)).expect("old");
        gpus.ready(old);
        gpus.sampled(&sample(&[(0, 80, 61)]));
        let refused = gpus.claim((old.0, 2), 60 * GIB, Some(1)).expect_err("no room for both");
        assert!(refused.older, "{refused:?}");
        // Another deployment's replica is not the new revision's to stop.
        assert!(!gpus.claim(key(9), 60 * GIB, Some(1)).expect_err("no room").older);
        gpus.release(old);
        assert_eq!(gpus.claim((old.0, 2), 60 * GIB, Some(1)).expect("room").indices, [0]);
    }

    #[test]
    fn without_uuids_gpus_are_named_by_pci_order_and_unknown_memory_is_refused() {
        let gpus = Gpus::default();
        let mut nameless = sample(&[(0, 24, 0), (1, 24, 0)]);
        nameless[1].uuid = None;
        gpus.sampled(&nameless);
        let pinned = gpus.claim(key(1), 30 * GIB, None).expect("both");
        assert_eq!(pinned.indices, [0, 1]);
        assert_eq!(
            pinned.env,
            [("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_owned()), ("CUDA_VISIBLE_DEVICES", "0,1".to_owned())]
        );
        nameless[0].memory_total_bytes = None;
        gpus.sampled(&nameless);
        let refused = gpus.claim(key(2), GIB, None).expect_err("unknown");
        assert!(refused.reason.contains("free memory is unknown"), "{refused:?}");
    }
}
