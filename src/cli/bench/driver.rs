//! The load loop, generic over an async request function so that it runs (and is tested)
//! without a server.
//!
//! Two shapes:
//! - **Closed loop**: `workers` tasks each send a request, wait for its answer and send the
//!   next. Latency counts from the actual send. This measures what a fixed pool of callers
//!   gets, and the most the server does at that concurrency.
//! - **Open loop**: request `i` is *scheduled* at `start + i / rate`, whatever the answers'
//!   pace, and its latency counts from that scheduled time. When the server stalls, the
//!   requests that should have gone out meanwhile wait (for a free slot among the outstanding
//!   limit) and their wait shows in their latency, as callers of a real service would see it.
//!   Measuring from the actual send instead would let a stalled sender skip exactly the slow
//!   samples ("coordinated omission").
//!
//! Sends of the open loop are paced by a thread that sleeps with the OS timer (tens of µs of
//! slack) rather than by the async runtime's timer, whose 1 ms resolution would send bursts
//! each millisecond and add up to 1 ms of pacing delay to every latency.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::report::Recorder;

/// How late the pacer may send a request due before the end and still send it after the
/// end: the OS timer's overshoot, not a backlog.
const PACING_SLACK: Duration = Duration::from_millis(1);

/// How to load the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// `workers` requests always in flight.
    Closed { workers: usize },
    /// `rate` requests per second on a fixed schedule, at most `max_outstanding` at once.
    Open { rate: f64, max_outstanding: usize },
}

/// The shape and the length of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPlan {
    pub shape: Shape,
    /// Load first sent for this long and left out of the statistics.
    pub warmup: Duration,
    /// Stop sending this long after the warm-up (in-flight requests still finish).
    pub duration: Option<Duration>,
    /// Stop after this many measured requests.
    pub requests: Option<u64>,
}

/// What one request did: which operation (an index into the workload's operations) and
/// whether it succeeded, with the events it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub op: usize,
    pub result: Result<u64, tonic::Code>,
}

/// Live counters for a progress line; updated as measured requests finish.
#[derive(Debug, Default)]
pub struct Progress {
    pub completed: AtomicU64,
    pub errors: AtomicU64,
}

/// What [`drive`] measured.
#[derive(Debug)]
pub struct Measured {
    pub recorder: Recorder,
    /// From the end of the warm-up to the last measured answer.
    pub elapsed: Duration,
    /// Open loop: measured requests scheduled before the end that were never sent.
    pub unsent: u64,
}

/// The phases of a run on the monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Phases {
    start: Instant,
    measure_from: Instant,
    stop_at: Option<Instant>,
}

impl Phases {
    fn new(plan: &LoadPlan) -> Self {
        let start = Instant::now();
        let measure_from = start + plan.warmup;
        Self {
            start,
            measure_from,
            stop_at: plan.duration.map(|d| measure_from + d),
        }
    }

    fn stopped(&self, at: Instant) -> bool {
        self.stop_at.is_some_and(|stop| at >= stop)
    }
}

/// What every request task writes to: statistics behind a lock held only to record (never
/// across an await), and lock-free counters.
#[derive(Debug)]
struct Shared {
    tally: Mutex<Tally>,
    progress: Arc<Progress>,
    /// Closed loop: measured requests claimed so far, against `--requests`.
    claimed: AtomicU64,
    /// Closed loop: the next request's sequence number.
    sequence: AtomicU64,
}

#[derive(Debug)]
struct Tally {
    recorder: Recorder,
    last_done: Option<Instant>,
}

impl Shared {
    fn record(&self, outcome: Outcome, sent: Instant, done: Instant) {
        let ok = outcome.result.is_ok();
        {
            // A panic elsewhere while recording leaves counts that are still counts.
            let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
            tally.recorder.record(
                outcome.op,
                done.saturating_duration_since(sent),
                outcome.result,
            );
            tally.last_done = Some(tally.last_done.map_or(done, |last| last.max(done)));
        }
        self.progress.completed.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `request` (called with a sequence number, which the workload uses to pick the
/// request and the connection) under `plan`, counting `operations` operations, and returns
/// what was measured.
pub async fn drive<F, Fut>(
    plan: LoadPlan,
    operations: usize,
    progress: Arc<Progress>,
    request: F,
) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally {
            recorder: Recorder::new(operations),
            last_done: None,
        }),
        progress,
        claimed: AtomicU64::new(0),
        sequence: AtomicU64::new(0),
    });
    let request = Arc::new(request);
    let phases = Phases::new(&plan);
    let unsent = match plan.shape {
        Shape::Closed { workers } => {
            closed(workers, phases, plan.requests, request, shared.clone()).await;
            0
        }
        Shape::Open {
            rate,
            max_outstanding,
        } => {
            let shared = shared.clone();
            let pacer = tokio::task::spawn_blocking(move || {
                let pacer = Pacer {
                    rate,
                    max_outstanding,
                    phases,
                    requests: plan.requests,
                };
                pacer.run(&tokio::runtime::Handle::current(), &request, &shared)
            });
            match pacer.await {
                Ok(unsent) => unsent,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => 0,
            }
        }
    };
    let mut tally = shared.tally.lock().unwrap_or_else(PoisonError::into_inner);
    let elapsed = tally.last_done.map_or(Duration::ZERO, |done| {
        done.saturating_duration_since(phases.measure_from)
    });
    Measured {
        recorder: std::mem::replace(&mut tally.recorder, Recorder::new(operations)),
        elapsed,
        unsent,
    }
}

/// `workers` tasks, each sending its next request when the last one answered.
async fn closed<F, Fut>(
    workers: usize,
    phases: Phases,
    requests: Option<u64>,
    request: Arc<F>,
    shared: Arc<Shared>,
) where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for _ in 0..workers.max(1) {
        let request = request.clone();
        let shared = shared.clone();
        tasks.spawn(async move {
            loop {
                let sent = Instant::now();
                if phases.stopped(sent) {
                    break;
                }
                let measured = sent >= phases.measure_from;
                if measured {
                    let claimed = shared.claimed.fetch_add(1, Ordering::Relaxed);
                    if requests.is_some_and(|limit| claimed >= limit) {
                        break;
                    }
                }
                let n = shared.sequence.fetch_add(1, Ordering::Relaxed);
                let outcome = request(n).await;
                if measured {
                    shared.record(outcome, sent, Instant::now());
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// The open loop's sender, on a blocking-pool thread of its own.
struct Pacer {
    rate: f64,
    max_outstanding: usize,
    phases: Phases,
    requests: Option<u64>,
}

impl Pacer {
    /// When request `i` is due.
    fn scheduled(&self, i: u64) -> Instant {
        self.phases.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// Measured requests scheduled from index `i` on that would have been sent before the
    /// end, with `sent` measured requests already sent.
    fn left_over(&self, mut i: u64, sent: u64) -> u64 {
        let Some(stop) = self.phases.stop_at else {
            return 0;
        };
        let mut left = 0;
        loop {
            let due = self.scheduled(i);
            if due >= stop || self.requests.is_some_and(|limit| sent + left >= limit) {
                return left;
            }
            if due >= self.phases.measure_from {
                left += 1;
            }
            i += 1;
        }
    }

    /// Sends each request at its scheduled time, or as soon after as a slot is free; waits
    /// for every request sent; returns the measured requests never sent.
    fn run<F, Fut>(
        &self,
        runtime: &tokio::runtime::Handle,
        request: &Arc<F>,
        shared: &Arc<Shared>,
    ) -> u64
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let slots = Arc::new(Semaphore::new(self.max_outstanding.max(1)));
        let mut sent = 0u64;
        let mut unsent = 0u64;
        for i in 0u64.. {
            let due = self.scheduled(i);
            if self.phases.stopped(due) {
                break;
            }
            let measured = due >= self.phases.measure_from;
            if measured && self.requests.is_some_and(|limit| sent >= limit) {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (slot, waited) = match slots.clone().try_acquire_owned() {
                Ok(slot) => (slot, false),
                // Every slot is taken: this request (and those due meanwhile) wait, and the
                // wait counts in their latency because it runs from `due`.
                Err(_) => match runtime.block_on(slots.clone().acquire_owned()) {
                    Ok(slot) => (slot, true),
                    Err(_) => break,
                },
            };
            // Past the end, a request that was held up is not sent; one that is merely a
            // sleep's overshoot late (it was due before the end) still is.
            let now = Instant::now();
            if self.phases.stopped(now)
                && (waited || now.saturating_duration_since(due) > PACING_SLACK)
            {
                unsent = self.left_over(i, sent);
                break;
            }
            let request = request.clone();
            let shared = shared.clone();
            runtime.spawn(async move {
                let outcome = request(i).await;
                if measured {
                    shared.record(outcome, due, Instant::now());
                }
                // Released only after recording, so that holding every slot means every
                // sent request is counted.
                drop(slot);
            });
            if measured {
                sent += 1;
            }
        }
        let all = u32::try_from(self.max_outstanding.max(1)).unwrap_or(u32::MAX);
        // Fails only if the semaphore were closed, which nothing does.
        let _ = runtime.block_on(slots.acquire_many(all));
        unsent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "server" that answers at once, except that request `stalled_at` takes 100 ms.
    fn stalls_once(
        stalled_at: u64,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static
    {
        move |n| {
            Box::pin(async move {
                if n == stalled_at {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Outcome {
                    op: 0,
                    result: Ok(0),
                }
            })
        }
    }

    fn plan(shape: Shape, requests: u64) -> LoadPlan {
        LoadPlan {
            shape,
            warmup: Duration::ZERO,
            duration: None,
            requests: Some(requests),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_latency_counts_from_the_scheduled_send() {
        // 1000/s with one request outstanding: while request 100 stalls for 100 ms, the ~100
        // requests scheduled during the stall cannot go out; each waits from its own scheduled
        // time, so their latencies run from ~100 ms down to ~1 ms.
        let open = Shape::Open {
            rate: 1000.0,
            max_outstanding: 1,
        };
        let measured = drive(
            plan(open, 300),
            1,
            Arc::new(Progress::default()),
            stalls_once(100),
        )
        .await;
        let stats = measured.recorder.total();
        assert_eq!(stats.requests(), 300);
        assert!(
            stats.percentiles().max >= 99_000,
            "{:?}",
            stats.percentiles()
        );
        let delayed = stats.count_at_least(10_000);
        assert!(
            (85..=150).contains(&delayed),
            "{delayed} requests of 300 took 10 ms or more; expected ~90"
        );
        // The schedule spans 0.3 s; the stall does not stretch it by more than its catch-up.
        assert!(
            measured.elapsed < Duration::from_millis(600),
            "{measured:?}"
        );

        // The same stall in a closed loop hides: only the stalled request is slow, because
        // the loop did not send while it waited (coordinated omission).
        let measured = drive(
            plan(Shape::Closed { workers: 1 }, 300),
            1,
            Arc::new(Progress::default()),
            stalls_once(100),
        )
        .await;
        let stats = measured.recorder.total();
        assert_eq!(stats.requests(), 300);
        assert!(
            stats.count_at_least(10_000) <= 3,
            "{:?}",
            stats.percentiles()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_keeps_the_rate_and_counts_what_it_could_not_send() {
        let open = Shape::Open {
            rate: 500.0,
            max_outstanding: 8,
        };
        let measured = drive(
            plan(open, 100),
            1,
            Arc::new(Progress::default()),
            stalls_once(u64::MAX),
        )
        .await;
        let rps = measured.recorder.total().requests() as f64 / measured.elapsed.as_secs_f64();
        assert!((400.0..=560.0).contains(&rps), "{rps} req/s at 500/s");
        assert_eq!(measured.unsent, 0);

        // A server that never answers within the run: 2 slots, then nothing more goes out.
        let open = Shape::Open {
            rate: 1000.0,
            max_outstanding: 2,
        };
        let plan = LoadPlan {
            shape: open,
            warmup: Duration::ZERO,
            duration: Some(Duration::from_millis(100)),
            requests: None,
        };
        let measured = drive(plan, 1, Arc::new(Progress::default()), |_| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Outcome {
                op: 0,
                result: Ok(0),
            }
        })
        .await;
        assert_eq!(measured.recorder.total().requests(), 2);
        assert!(
            (95..=100).contains(&measured.unsent),
            "unsent {}",
            measured.unsent
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn warmup_is_left_out_and_requests_are_exact() {
        let progress = Arc::new(Progress::default());
        let calls = Arc::new(AtomicU64::new(0));
        let plan = LoadPlan {
            shape: Shape::Closed { workers: 4 },
            warmup: Duration::from_millis(50),
            duration: None,
            requests: Some(123),
        };
        let counted = calls.clone();
        let measured = drive(plan, 2, progress.clone(), move |n| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Outcome {
                    op: (n % 2) as usize,
                    result: if n % 10 == 0 {
                        Err(tonic::Code::Unavailable)
                    } else {
                        Ok(0)
                    },
                }
            }
        })
        .await;
        let total = measured.recorder.total();
        assert_eq!(total.requests(), 123);
        // The warm-up sent requests too (4 workers for 50 ms of 1 ms requests).
        assert!(calls.load(Ordering::Relaxed) >= 123 + 40);
        assert_eq!(progress.completed.load(Ordering::Relaxed), 123);
        assert_eq!(progress.errors.load(Ordering::Relaxed), total.error_count());
        assert!(total.error_count() > 0);
        assert!(measured.recorder.operations()[0].requests() > 0);
        assert!(measured.recorder.operations()[1].requests() > 0);
    }
}
