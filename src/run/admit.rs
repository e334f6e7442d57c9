//! Admission: a stage computes when what it asks for (`resources:`; one CPU by default, and a
//! built-in's estimate of its memory) fits in the machine's CPU and memory budget beside what
//! already computes; a stage larger than the whole budget computes alone. A stage holds its share
//! from an attempt's start through its checks and commit; deciding, restoring, a retry's backoff
//! and a month-over-month check's wait for the previous partition take nothing, nor does a stage
//! that computes elsewhere (on Spark, or as a job).

use std::sync::Mutex;

use tokio::sync::Notify;

/// What the stages of one run may use at once (`--cpus`, `--memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub cpus: u32,
    /// Bytes.
    pub memory: u64,
}

impl Budget {
    /// The machine's cores, and 80% of its memory.
    pub fn machine() -> Budget {
        Budget {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory: physical_memory() / 5 * 4,
        }
    }

    /// `--cpus` and `--memory` over the machine's defaults.
    pub fn with(cpus: Option<u32>, memory: Option<u64>) -> Budget {
        let machine = Budget::machine();
        Budget {
            cpus: cpus.unwrap_or(machine.cpus).max(1),
            memory: memory.unwrap_or(machine.memory).max(1),
        }
    }
}

/// The machine's physical memory in bytes (an unbounded budget where the system does not say).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf reads a system constant and has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(size as u64)
}

/// What one stage asks for while it computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub cpus: u32,
    /// Bytes.
    pub memory: u64,
}

impl std::fmt::Display for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus = match self.cpus {
            1 => "1 CPU".to_owned(),
            n => format!("{n} CPUs"),
        };
        if self.memory == 0 {
            f.write_str(&cpus)
        } else {
            write!(f, "{cpus} and {}", size(self.memory))
        }
    }
}

/// A size as `resources.memory` reads it (`3.0 GB` is 3×10⁹ bytes).
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().si().to_string()
}

/// The budget and what is taken of it.
pub struct Admission {
    budget: Budget,
    taken: Mutex<Taken>,
    freed: Notify,
}

#[derive(Default)]
struct Taken {
    cpus: u32,
    memory: u64,
    holders: usize,
}

/// A stage's share of the budget, given back when dropped.
pub struct Ticket<'a> {
    admission: &'a Admission,
    demand: Demand,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut taken = self.admission.lock();
        taken.cpus -= self.demand.cpus;
        taken.memory -= self.demand.memory;
        taken.holders -= 1;
        drop(taken);
        self.admission.freed.notify_waiters();
    }
}

impl Admission {
    pub fn new(budget: Budget) -> Admission {
        Admission {
            budget,
            taken: Mutex::new(Taken::default()),
            freed: Notify::new(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket now, or `None` with what is in use when `demand` does not fit beside it.
    pub fn try_admit(&self, demand: Demand) -> Result<Ticket<'_>, Demand> {
        let mut taken = self.lock();
        let fits = taken.cpus + demand.cpus <= self.budget.cpus
            && taken.memory.saturating_add(demand.memory) <= self.budget.memory;
        if taken.holders > 0 && !fits {
            return Err(Demand {
                cpus: taken.cpus,
                memory: taken.memory,
            });
        }
        taken.cpus += demand.cpus;
        taken.memory += demand.memory;
        taken.holders += 1;
        Ok(Ticket {
            admission: self,
            demand,
        })
    }

    /// A ticket as soon as `demand` fits (at once when nothing else computes).
    pub async fn admit(&self, demand: Demand) -> Ticket<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so that a ticket given back in between is not missed.
            freed.as_mut().enable();
            if let Ok(ticket) = self.try_admit(demand) {
                return ticket;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    #[test]
    fn stages_that_do_not_fit_together_wait_and_a_large_one_runs_alone() {
        let admission = Admission::new(Budget {
            cpus: 2,
            memory: 4 * GB,
        });
        let big = Demand {
            cpus: 1,
            memory: 3 * GB,
        };
        let first = admission.try_admit(big).ok().unwrap();
        let in_use = admission.try_admit(big).err().unwrap();
        assert_eq!(in_use, big);
        let small = Demand {
            cpus: 1,
            memory: GB,
        };
        let beside = admission.try_admit(small).ok().unwrap();
        assert!(admission.try_admit(small).is_err(), "no CPU left");
        drop((first, beside));
        let huge = Demand {
            cpus: 8,
            memory: 64 * GB,
        };
        let Ok(alone) = admission.try_admit(huge) else {
            panic!("alone, it runs");
        };
        assert!(admission.try_admit(small).is_err());
        drop(alone);
        assert!(admission.try_admit(small).is_ok());
    }

    #[tokio::test]
    async fn a_waiting_stage_starts_when_a_ticket_is_given_back() {
        let admission = std::sync::Arc::new(Admission::new(Budget {
            cpus: 1,
            memory: GB,
        }));
        let one = Demand { cpus: 1, memory: 0 };
        let held = admission.try_admit(one).ok().unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move {
                let _ticket = admission.admit(one).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("admitted")
            .unwrap();
    }

    #[test]
    fn the_machine_has_memory() {
        assert!(physical_memory() > 64 << 20);
    }
}
