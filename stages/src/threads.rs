//! Work on several threads at once, or on this one when the system refuses a thread (a process or
//! container at its thread limit): slower, never a failure.

use std::sync::Mutex;

/// Runs `side` on a thread of its own while `here` runs on this one, and returns both results.
/// When the system refuses a thread (a process or container at its thread limit), `side` runs
/// after `here`, on this thread: slower, never a failure. A panic in `side` goes on here.
pub fn beside<A: Send, B>(side: impl FnOnce() -> A + Send, here: impl FnOnce() -> B) -> (A, B) {
    // The work stays here until the thread has taken it, so a refused thread leaves it to run.
    let work = Mutex::new(Some(side));
    std::thread::scope(|scope| {
        let work = &work;
        let thread = std::thread::Builder::new().spawn_scoped(scope, move || {
            let side = work.lock().unwrap_or_else(|e| e.into_inner()).take();
            side.map(|side| side())
        });
        let b = here();
        let a = match thread {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
            Err(_) => None,
        };
        let a = a.unwrap_or_else(|| {
            let side = work.lock().unwrap_or_else(|e| e.into_inner()).take();
            side.expect("the work runs once: on the thread or here")()
        });
        (a, b)
    })
}

/// Runs `work(0)`, …, `work(n - 1)` each on a thread of its own and returns their results in
/// order. A part whose thread the system refuses runs here, after the others have started;
/// a panic in any part goes on here.
pub fn each<R: Send>(n: usize, work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let work = &work;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .map(|i| std::thread::Builder::new().spawn_scoped(scope, move || work(i)))
            .collect();
        threads
            .into_iter()
            .enumerate()
            .map(|(i, thread)| match thread {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                Err(_) => work(i),
            })
            .collect()
    })
}

/// Drops `value` on a thread of its own (freeing a large table takes tens of milliseconds that
/// the caller need not wait for), or here when the system refuses a thread.
pub fn drop_beside<T: Send + 'static>(value: T) {
    // A refused spawn drops the closure, and `value` with it, here.
    let _ = std::thread::Builder::new().spawn(move || drop(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_results_come_back_in_order() {
        let (a, b) = beside(|| (1..=10).sum::<u32>(), || "here");
        assert_eq!((a, b), (55, "here"));
    }

    #[test]
    fn each_part_once_in_order() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let out = each(5, |i| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            i * 10
        });
        assert_eq!(out, [0, 10, 20, 30, 40]);
        assert_eq!(calls.into_inner(), 5);
    }

    #[test]
    fn a_panic_beside_goes_on_here() {
        let caught = std::panic::catch_unwind(|| beside(|| panic!("side"), || 1));
        assert!(caught.is_err());
    }
}
