//! Placement: which runner gets a new box.
//!
//! Only runners that are ready (checked in within the window), not draining
//! and not decommissioned are candidates, and only those whose capacity minus
//! what is already allocated to their boxes fits the request. Candidates are
//! ranked by a score (higher is better): the free share of CPU, memory and
//! disk left after placing the box, fewer boxes already running, and penalties
//! when the runner's *measured* use is past 90 % CPU, 75 % memory or 75 % disk
//! (the thresholds Daytona uses). Ties go to the runner with the lower name,
//! so the choice is deterministic.
//!
//! Runners whose scores are within [`NEAR_TIE`] of the best are tried in a
//! random order ([`spread_near_ties`]), so concurrent creates spread over
//! equally good runners instead of queueing on one runner's row lock.
//!
//! The ranking is advisory: the database update that reserves the resources
//! re-checks the room atomically, so concurrent creates cannot overbook a
//! runner (see `boxes::create`).

use protocol::Resources;
use uuid::Uuid;

/// Weight of free CPU in the score.
const W_CPU: f64 = 0.35;
/// Weight of free memory.
const W_MEMORY: f64 = 0.35;
/// Weight of free disk.
const W_DISK: f64 = 0.2;
/// Weight of "few boxes".
const W_BOXES: f64 = 0.1;
/// Subtracted per resource whose measured use is past its threshold.
const HOT_PENALTY: f64 = 0.5;
/// Measured CPU share past which a runner is penalised.
const HOT_CPU: f64 = 0.90;
/// Measured memory share past which a runner is penalised.
const HOT_MEMORY: f64 = 0.75;
/// Measured disk share past which a runner is penalised.
const HOT_DISK: f64 = 0.75;

/// Scores this close to the best count as equally good.
pub const NEAR_TIE: f64 = 0.02;

/// A schedulable runner as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Runner id.
    pub id: Uuid,
    /// Runner name.
    pub name: String,
    /// What it offers boxes in total.
    pub capacity: Resources,
    /// Sum of the limits of its boxes.
    pub allocated: Resources,
    /// Measured use.
    pub usage: Resources,
    /// Live boxes pinned to it.
    pub boxes: u64,
}

impl Candidate {
    /// True when `req` fits in capacity minus allocation on every resource.
    pub fn fits(&self, req: &Resources) -> bool {
        fits(
            self.capacity.cpu_millicores,
            self.allocated.cpu_millicores,
            req.cpu_millicores,
        ) && fits(
            self.capacity.memory_mib,
            self.allocated.memory_mib,
            req.memory_mib,
        ) && fits(
            self.capacity.disk_mib,
            self.allocated.disk_mib,
            req.disk_mib,
        )
    }

    /// Score after placing `req` here (higher is better).
    pub fn score(&self, req: &Resources) -> f64 {
        let free = |cap: u64, alloc: u64, want: u64| -> f64 {
            if cap == 0 {
                return 0.0;
            }
            cap.saturating_sub(alloc).saturating_sub(want) as f64 / cap as f64
        };
        let share = |used: u64, cap: u64| {
            if cap == 0 {
                1.0
            } else {
                used as f64 / cap as f64
            }
        };
        let mut s = W_CPU
            * free(
                self.capacity.cpu_millicores,
                self.allocated.cpu_millicores,
                req.cpu_millicores,
            )
            + W_MEMORY
                * free(
                    self.capacity.memory_mib,
                    self.allocated.memory_mib,
                    req.memory_mib,
                )
            + W_DISK
                * free(
                    self.capacity.disk_mib,
                    self.allocated.disk_mib,
                    req.disk_mib,
                )
            + W_BOXES / (1.0 + self.boxes as f64 / 10.0);
        if share(self.usage.cpu_millicores, self.capacity.cpu_millicores) > HOT_CPU {
            s -= HOT_PENALTY;
        }
        if share(self.usage.memory_mib, self.capacity.memory_mib) > HOT_MEMORY {
            s -= HOT_PENALTY;
        }
        if share(self.usage.disk_mib, self.capacity.disk_mib) > HOT_DISK {
            s -= HOT_PENALTY;
        }
        s
    }
}

fn fits(capacity: u64, allocated: u64, want: u64) -> bool {
    allocated
        .checked_add(want)
        .is_some_and(|total| total <= capacity)
}

/// The candidates with room for `req`, best first.
pub fn rank(candidates: Vec<Candidate>, req: &Resources) -> Vec<Candidate> {
    let mut scored: Vec<(f64, Candidate)> = candidates
        .into_iter()
        .filter(|c| c.fits(req))
        .map(|c| (c.score(req), c))
        .collect();
    scored.sort_by(|(sa, a), (sb, b)| sb.total_cmp(sa).then_with(|| a.name.cmp(&b.name)));
    scored.into_iter().map(|(_, c)| c).collect()
}

/// Shuffle the leading candidates of `ranked` (best first) whose score for
/// `req` is within [`NEAR_TIE`] of the best; the rest keep their order.
pub fn spread_near_ties(mut ranked: Vec<Candidate>, req: &Resources) -> Vec<Candidate> {
    use rand::seq::SliceRandom;
    let Some(best) = ranked.first().map(|c| c.score(req)) else {
        return ranked;
    };
    let n = ranked
        .iter()
        .take_while(|c| c.score(req) >= best - NEAR_TIE)
        .count();
    ranked[..n].shuffle(&mut rand::rng());
    ranked
}

/// Why no runner could take a box.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoPlacement {
    /// No runner is ready (registered ones are initializing or unresponsive).
    NoneReady {
        /// Registered, never checked in.
        initializing: usize,
        /// Silent past the window.
        unresponsive: usize,
    },
    /// Every ready runner is draining.
    AllDraining {
        /// How many.
        draining: usize,
    },
    /// Ready runners exist but none has room.
    NoCapacity {
        /// How many were considered.
        ready: usize,
        /// The most free resources any of them has (per resource).
        largest_free: Resources,
    },
}

impl NoPlacement {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            NoPlacement::NoneReady { .. } => "no_runners_ready",
            NoPlacement::AllDraining { .. } => "all_runners_draining",
            NoPlacement::NoCapacity { .. } => "no_capacity",
        }
    }

    /// Message for people.
    pub fn message(&self, req: &Resources) -> String {
        match self {
            NoPlacement::NoneReady {
                initializing,
                unresponsive,
            } => {
                if initializing + unresponsive == 0 {
                    "no runner is registered; register one with POST /api/admin/runners".to_string()
                } else {
                    format!(
                        "no runner is ready ({initializing} initializing, {unresponsive} unresponsive); retry when one checks in"
                    )
                }
            }
            NoPlacement::AllDraining { draining } => {
                format!("all {draining} ready runner(s) are draining; no runner accepts new boxes")
            }
            NoPlacement::NoCapacity {
                ready,
                largest_free,
            } => format!(
                "no ready runner has room for {} millicores, {} MiB memory and {} MiB disk \
                 ({ready} ready; the most free on any: {} millicores, {} MiB memory, {} MiB disk)",
                req.cpu_millicores,
                req.memory_mib,
                req.disk_mib,
                largest_free.cpu_millicores,
                largest_free.memory_mib,
                largest_free.disk_mib
            ),
        }
    }
}

/// The most free of each resource among `ready`.
pub fn largest_free(ready: &[Candidate]) -> Resources {
    let mut r = Resources::default();
    for c in ready {
        r.cpu_millicores = r.cpu_millicores.max(
            c.capacity
                .cpu_millicores
                .saturating_sub(c.allocated.cpu_millicores),
        );
        r.memory_mib = r
            .memory_mib
            .max(c.capacity.memory_mib.saturating_sub(c.allocated.memory_mib));
        r.disk_mib = r
            .disk_mib
            .max(c.capacity.disk_mib.saturating_sub(c.allocated.disk_mib));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u64, mem: u64, disk: u64) -> Resources {
        Resources {
            cpu_millicores: cpu,
            memory_mib: mem,
            disk_mib: disk,
        }
    }

    fn cand(
        name: &str,
        cap: Resources,
        alloc: Resources,
        usage: Resources,
        boxes: u64,
    ) -> Candidate {
        Candidate {
            id: Uuid::new_v4(),
            name: name.into(),
            capacity: cap,
            allocated: alloc,
            usage,
            boxes,
        }
    }

    #[test]
    fn only_runners_with_room_on_every_resource_are_ranked() {
        let req = res(1000, 1024, 1024);
        let cap = res(4000, 4096, 4096);
        let full_cpu = cand("a", cap, res(3500, 0, 0), res(0, 0, 0), 1);
        let full_mem = cand("b", cap, res(0, 3500, 0), res(0, 0, 0), 1);
        let full_disk = cand("c", cap, res(0, 0, 3500), res(0, 0, 0), 1);
        let exact = cand("d", cap, res(3000, 3072, 3072), res(0, 0, 0), 3);
        let ranked = rank(vec![full_cpu, full_mem, full_disk, exact], &req);
        assert_eq!(
            ranked.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            vec!["d"]
        );
        assert!(!cand("e", cap, res(u64::MAX, 0, 0), res(0, 0, 0), 0).fits(&req));
    }

    #[test]
    fn emptier_runners_win_and_ties_break_by_name() {
        let req = res(500, 512, 512);
        let cap = res(8000, 16384, 65536);
        let busy = cand("busy", cap, res(6000, 12000, 30000), res(0, 0, 0), 12);
        let idle_b = cand("idle-b", cap, res(0, 0, 0), res(0, 0, 0), 0);
        let idle_a = cand("idle-a", cap, res(0, 0, 0), res(0, 0, 0), 0);
        let ranked = rank(vec![busy, idle_b, idle_a], &req);
        assert_eq!(
            ranked.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            vec!["idle-a", "idle-b", "busy"]
        );
    }

    #[test]
    fn measured_hot_runners_are_penalised() {
        let req = res(100, 100, 100);
        let cap = res(8000, 8192, 8192);
        let cool = cand("cool", cap, res(4000, 4000, 4000), res(1000, 1000, 1000), 5);
        let hot = cand("hot", cap, res(0, 0, 0), res(7900, 8000, 100), 0);
        let ranked = rank(vec![hot, cool], &req);
        assert_eq!(ranked[0].name, "cool");
    }

    #[test]
    fn near_ties_are_spread_and_clear_winners_stay_first() {
        let req = res(100, 100, 100);
        let cap = res(8000, 8192, 8192);
        let twins: Vec<Candidate> = (0..3)
            .map(|i| cand(&format!("twin-{i}"), cap, res(0, 0, 0), res(0, 0, 0), 0))
            .collect();
        let busy = cand("busy", cap, res(6000, 6000, 6000), res(0, 0, 0), 20);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut all = twins.clone();
            all.push(busy.clone());
            let out = spread_near_ties(rank(all, &req), &req);
            assert_eq!(out.len(), 4);
            assert_eq!(
                out[3].name, "busy",
                "a clearly worse runner is never moved up"
            );
            firsts.insert(out[0].name.clone());
        }
        // 200 shuffles of three equals: each comes first at some point (chance of failure ~3e-35).
        assert_eq!(firsts.len(), 3);
        assert!(spread_near_ties(Vec::new(), &req).is_empty());
    }

    #[test]
    fn reasons_name_the_problem() {
        let req = res(1000, 1024, 2048);
        let none = NoPlacement::NoneReady {
            initializing: 0,
            unresponsive: 0,
        };
        assert_eq!(none.code(), "no_runners_ready");
        assert!(none.message(&req).contains("no runner is registered"));
        let some = NoPlacement::NoneReady {
            initializing: 1,
            unresponsive: 2,
        };
        assert!(
            some.message(&req)
                .contains("1 initializing, 2 unresponsive")
        );
        let drain = NoPlacement::AllDraining { draining: 3 };
        assert_eq!(drain.code(), "all_runners_draining");
        let cap = res(4000, 4096, 4096);
        let ready = vec![cand("a", cap, res(3500, 0, 0), res(0, 0, 0), 1)];
        let full = NoPlacement::NoCapacity {
            ready: 1,
            largest_free: largest_free(&ready),
        };
        assert_eq!(full.code(), "no_capacity");
        assert!(
            full.message(&req).contains("500 millicores"),
            "{}",
            full.message(&req)
        );
    }
}
