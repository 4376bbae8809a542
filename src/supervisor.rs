//! Supervision of the threads that are not shards: the admin endpoint's (`admin`) and the
//! cluster uplink's (`cluster`). Each runs its body under [`supervise`] on its own thread:
//! a panic is caught at the top of the thread, logged with its message, counted in the
//! thread's [`ThreadWatch`] (exported as `corecast_thread_restarts_total`, and the uplink's
//! shown on `/healthz`), and the body runs again after a backoff. What the body must keep
//! across a restart (the admin listener, the uplink's rings) is owned outside it, by the
//! thread, so nothing a shard holds the other end of is ever dropped by a panic.
//!
//! A leaf: it depends on nothing else in the crate.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Delay before the first restart; it doubles with each restart up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between restarts, for a body that panics each time it starts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A run at least this long was healthy: the next death starts over at [`FIRST_BACKOFF`].
const STABLE_RUN: Duration = Duration::from_secs(60);

/// One supervised thread's state, written by that thread and read by the admin endpoint.
#[derive(Default, Debug)]
pub struct ThreadWatch {
    /// Times the thread's body died (panicked) and was restarted.
    restarts: AtomicU64,
    /// True from a death until the body runs again.
    down: AtomicBool,
    /// The last death's panic message.
    cause: Mutex<String>,
}

impl ThreadWatch {
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// The last death's panic message (empty if it never died).
    pub fn cause(&self) -> String {
        self.cause.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn on_death(&self, cause: &str) {
        if let Ok(mut c) = self.cause.lock() {
            c.clear();
            c.push_str(cause);
        }
        self.down.store(true, Relaxed);
    }

    fn on_restart(&self) {
        self.restarts.fetch_add(1, Relaxed);
        self.down.store(false, Relaxed);
    }
}

/// Runs `body` until it returns, restarting it after each panic. `name` names the thread
/// in the log lines; `wait(delay)` spends the backoff before a restart (the uplink keeps
/// draining its rings meanwhile, the admin endpoint just sleeps). Returns when `body`
/// returns normally.
pub fn supervise(name: &str, watch: &ThreadWatch, mut wait: impl FnMut(Duration), mut body: impl FnMut()) {
    let mut delay = first_backoff();
    loop {
        let began = Instant::now();
        match catch_unwind(AssertUnwindSafe(&mut body)) {
            Ok(()) => return,
            Err(panic) => {
                if began.elapsed() >= STABLE_RUN {
                    delay = first_backoff();
                }
                let cause = panic_message(panic.as_ref());
                watch.on_death(&cause);
                tracing::error!(
                    "the {name} thread died: panicked: {cause}; restarting it in {} ms",
                    delay.as_millis()
                );
                wait(delay);
                watch.on_restart();
                tracing::warn!("the {name} thread restarted (restarts so far: {})", watch.restarts());
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The text a panic carries (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// [`FIRST_BACKOFF`]; debug builds take `CORECAST_TEST_RESTART_BACKOFF_MS` so the tests
/// can look at a thread while it is down.
fn first_backoff() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("CORECAST_TEST_RESTART_BACKOFF_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    FIRST_BACKOFF
}

/// Debug builds only: panics once per process at the call site named `place` when
/// `CORECAST_TEST_PANIC` names it (`admin`, `cluster`), so the tests can kill a thread.
/// Release builds compile it to nothing.
pub fn test_panic_hook(place: &str) {
    #[cfg(debug_assertions)]
    {
        // Read once: the uplink calls this for every batch.
        static WANTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        static FIRED: AtomicBool = AtomicBool::new(false);
        let wanted = WANTED.get_or_init(|| std::env::var("CORECAST_TEST_PANIC").ok());
        if wanted.as_deref() == Some(place) && !FIRED.swap(true, Relaxed) {
            panic!("test hook: CORECAST_TEST_PANIC={place}");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = place;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_panicking_body_is_counted_waited_for_and_run_again_until_it_returns() {
        let watch = ThreadWatch::default();
        let runs = Cell::new(0);
        let mut waits = Vec::new();
        supervise(
            "test",
            &watch,
            |d| waits.push(d),
            || {
                runs.set(runs.get() + 1);
                if runs.get() <= 3 {
                    panic!("run {} failed", runs.get());
                }
            },
        );
        assert_eq!(runs.get(), 4);
        assert_eq!(watch.restarts(), 3);
        assert!(!watch.is_down());
        assert_eq!(watch.cause(), "run 3 failed");
        let first = first_backoff();
        assert_eq!(
            waits,
            vec![first, (first * 2).min(MAX_BACKOFF), (first * 4).min(MAX_BACKOFF)]
        );
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let p = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "plain");
        let p = catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "formatted 7");
    }
}
