//! Work on several threads at once, or on this one when the system refuses a thread (a process or
//! container at its thread limit): slower, never a failure.

use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

/// Starts `run(value)` on a thread of `scope`, or gives `value` back when the system refuses a
/// thread (a spawn that fails drops its closure: the value waits in a cell the thread takes it
/// from).
fn spawn_or_back<'scope, V: Send + 'scope, T: Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    value: V,
    run: impl FnOnce(V) -> T + Send + 'scope,
) -> Result<ScopedJoinHandle<'scope, T>, V> {
    #[cfg(test)]
    if tests::REFUSED.get() {
        return Err(value);
    }
    let cell = Arc::new(Mutex::new(Some(value)));
    let theirs = cell.clone();
    let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
        let value = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
        run(value.expect("the value is taken back only when the thread is refused"))
    });
    spawned.map_err(|_| {
        let value = cell.lock().unwrap_or_else(|e| e.into_inner()).take();
        value.expect("a refused thread leaves the value in the cell")
    })
}

/// Waits for `thread`; a panic there goes on here.
fn join<T>(thread: ScopedJoinHandle<'_, T>) -> T {
    thread
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `side` on a thread of its own while `here` runs on this one, and returns both results.
/// When the system refuses a thread (a process or container at its thread limit), `side` runs
/// after `here`, on this thread: slower, never a failure. A panic in `side` goes on here.
pub fn beside<A: Send, B>(side: impl FnOnce() -> A + Send, here: impl FnOnce() -> B) -> (A, B) {
    std::thread::scope(|scope| {
        let thread = spawn_or_back(scope, side, |side| side());
        let b = here();
        let a = match thread {
            Ok(thread) => join(thread),
            Err(side) => side(),
        };
        (a, b)
    })
}

/// Runs `work(0)`, …, `work(n - 1)` each on a thread of its own and returns their results in
/// order. A part whose thread the system refuses runs here, after the others have started;
/// a panic in any part goes on here.
pub fn each<R: Send>(n: usize, work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let work = &work;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n).map(|i| spawn_or_back(scope, i, work)).collect();
        threads
            .into_iter()
            .map(|thread| match thread {
                Ok(thread) => join(thread),
                Err(i) => work(i),
            })
            .collect()
    })
}

/// Runs `work(0)`, …, `work(n - 1)` on as many threads as there are cores (at most `n`), thread
/// t taking items t, t + threads, …, and returns their results in order (as [`each`] does when
/// the system refuses a thread).
pub fn spread<R: Send>(n: usize, work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |cores| cores.get())
        .clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(work).collect();
    }
    let mut done: Vec<(usize, R)> = each(threads, |t| {
        (t..n)
            .step_by(threads)
            .map(|k| (k, work(k)))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    done.sort_by_key(|(k, _)| *k);
    done.into_iter().map(|(_, result)| result).collect()
}

/// Runs `source` on a thread of its own, `depth` items ahead of `here`, which takes them in order
/// (reading the next chunk of a file while this one is parsed, say). `source` says `None` after
/// the last item; when `here` returns early, `source` stops at its next item. When the system
/// refuses a thread, each item is made here as it is taken. A panic in `source` goes on here.
pub fn source_beside<T: Send, R>(
    depth: usize,
    source: impl FnMut() -> Option<T> + Send,
    here: impl FnOnce(&mut dyn Iterator<Item = T>) -> R,
) -> R {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth);
        let fed = spawn_or_back(scope, source, move |mut source| {
            while let Some(item) = source() {
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        match fed {
            Ok(thread) => {
                let mut items = rx.into_iter();
                let result = here(&mut items);
                drop(items);
                join(thread);
                result
            }
            Err(mut source) => here(&mut std::iter::from_fn(&mut source)),
        }
    })
}

/// Runs `sink` on a thread of its own, taking in order each item `here` sends it, with up to
/// `depth` waiting (writing one table while the next is computed, say). `here`'s sending fails
/// once `sink` has failed, and the sink's error is the one returned. When the system refuses a
/// thread, `sink` takes each item here as it is sent. A panic in `sink` goes on here.
pub fn sink_beside<T: Send, R>(
    depth: usize,
    sink: impl FnMut(T) -> Result<(), crate::StageError> + Send,
    here: impl FnOnce(
        &mut dyn FnMut(T) -> Result<(), crate::StageError>,
    ) -> Result<R, crate::StageError>,
) -> Result<R, crate::StageError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<T>(depth);
        let drained = spawn_or_back(scope, sink, move |mut sink| {
            rx.into_iter().try_for_each(&mut sink)
        });
        match drained {
            Ok(thread) => {
                let result = {
                    let tx = tx;
                    here(&mut |item| {
                        tx.send(item)
                            .map_err(|_| crate::StageError::new("the writer stopped".to_owned()))
                    })
                };
                // The sink's error, when it failed, is the cause of any error here.
                join(thread).and(result)
            }
            Err(mut sink) => here(&mut sink),
        }
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

    thread_local! {
        /// Makes this thread's spawns fail, as a system at its thread limit does.
        pub(super) static REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A source of 1, 2, …, `last`.
    fn one_to(last: u32) -> impl FnMut() -> Option<u32> + Send {
        let mut next = 0;
        move || {
            next += 1;
            (next <= last).then_some(next)
        }
    }

    /// With every thread refused, each helper does the same work on this thread, in order.
    #[test]
    fn a_refused_thread_leaves_the_work_here() {
        REFUSED.set(true);
        assert_eq!(beside(|| 1, || 2), (1, 2));
        assert_eq!(each(3, |i| i * 2), [0, 2, 4]);
        assert_eq!(spread(5, |i| i * 3), [0, 3, 6, 9, 12]);
        let all: Vec<u32> = source_beside(1, one_to(10), |items| items.collect());
        assert_eq!(all, (1..=10).collect::<Vec<_>>());
        let mut got = Vec::new();
        let sent = sink_beside(
            1,
            |item: u32| {
                got.push(item);
                Ok(())
            },
            |send| (0..10).try_for_each(send),
        );
        REFUSED.set(false);
        assert!(sent.is_ok());
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

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
    fn spread_runs_each_item_once_and_gives_the_results_in_order() {
        for n in [0, 1, 2, 7, 33] {
            let calls = std::sync::atomic::AtomicUsize::new(0);
            let out = spread(n, |i| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                i * 10
            });
            assert_eq!(out, (0..n).map(|i| i * 10).collect::<Vec<_>>());
            assert_eq!(calls.into_inner(), n);
        }
    }

    #[test]
    fn a_source_beside_gives_its_items_in_order_and_stops_when_left() {
        let all: Vec<u32> = source_beside(2, one_to(100), |items| items.collect());
        assert_eq!(all, (1..=100).collect::<Vec<_>>());
        let made = std::sync::atomic::AtomicUsize::new(0);
        let first: Vec<usize> = source_beside(
            1,
            || Some(made.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            |items| items.take(3).collect(),
        );
        assert_eq!(first, [0, 1, 2]);
        // What was made ahead of the taker: at most the queue and one in hand.
        assert!(made.into_inner() <= 3 + 2);
    }

    #[test]
    fn a_sink_beside_takes_every_item_and_its_error_wins() {
        let mut got = Vec::new();
        let n = sink_beside(
            1,
            |item: u32| {
                got.push(item);
                Ok(())
            },
            |send| {
                for i in 0..50 {
                    send(i)?;
                }
                Ok(50)
            },
        )
        .unwrap();
        assert_eq!((n, got), (50, (0..50).collect::<Vec<_>>()));
        let failed = sink_beside(
            1,
            |item: u32| match item {
                3 => Err(crate::StageError::new("disk full".to_owned())),
                _ => Ok(()),
            },
            |send| {
                for i in 0.. {
                    send(i)?;
                }
                Ok(())
            },
        );
        assert_eq!(failed.unwrap_err().message, "disk full");
    }

    #[test]
    fn a_panic_beside_goes_on_here() {
        let caught = std::panic::catch_unwind(|| beside(|| panic!("side"), || 1));
        assert!(caught.is_err());
    }
}
