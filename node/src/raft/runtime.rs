//! [`NodeRuntime`]: the async runtime openraft runs on — tokio, with one
//! change: the random numbers openraft draws (election timeouts, the phase of
//! its tick) can come from a seed.
//!
//! A node never sets the seed, and then every draw is fresh from the
//! operating system's entropy, as with openraft's own tokio runtime. The
//! deterministic simulation (crate `lmskv-sim`) seeds each run with
//! [`seed_thread`], so that a run's elections replay from its seed: all of
//! its simulated hosts run on the seeding thread.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::OptionalSend;
use openraft_rt::AsyncRuntime;
use openraft_rt_tokio::{
    TokioInstant, TokioMpsc, TokioMutex, TokioOneshot, TokioRuntime, TokioWatch,
};
use rand_openraft::rngs::SmallRng;
use rand_openraft::{Rng, SeedableRng};

thread_local! {
    /// The generator seeds are drawn from on this thread, once seeded.
    static SEEDS: RefCell<Option<SmallRng>> = const { RefCell::new(None) };
}

/// Makes openraft's random draws on this thread follow `seed` (`None`:
/// fresh entropy again).
pub fn seed_thread(seed: Option<u64>) {
    SEEDS.with(|s| *s.borrow_mut() = seed.map(SmallRng::seed_from_u64));
}

/// Tokio, with openraft's random draws seedable per thread.
pub struct NodeRuntime {
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for NodeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntime").finish()
    }
}

impl AsyncRuntime for NodeRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = SmallRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let seeded = SEEDS.with(|s| s.borrow_mut().as_mut().map(|g| g.next_u64()));
        match seeded {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::seed_from_u64(rand_openraft::random()),
        }
    }

    type Mpsc = TokioMpsc;
    type Watch = TokioWatch;
    type Oneshot = TokioOneshot;
    type Mutex<T: OptionalSend + 'static> = TokioMutex<T>;

    fn new(threads: usize) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("build tokio runtime");
        NodeRuntime { rt }
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.rt.block_on(future)
    }
}
