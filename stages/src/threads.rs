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

/// Runs `source` on a thread of its own, `depth` items ahead of `here`, which takes them in order
/// (reading the next chunk of a file while this one is parsed, say). `source` says `None` after
/// the last item; when `here` returns early, `source` stops at its next item. When the system
/// refuses a thread, each item is made here as it is taken. A panic in `source` goes on here.
pub fn source_beside<T: Send, R>(
    depth: usize,
    source: impl FnMut() -> Option<T> + Send,
    here: impl FnOnce(&mut dyn Iterator<Item = T>) -> R,
) -> R {
    let work = Mutex::new(Some(source));
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth);
        let taken = &work;
        let thread = std::thread::Builder::new().spawn_scoped(scope, move || {
            let source = taken.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut source) = source {
                while let Some(item) = source() {
                    if tx.send(item).is_err() {
                        break;
                    }
                }
            }
        });
        match thread {
            Ok(thread) => {
                let mut items = rx.into_iter();
                let result = here(&mut items);
                drop(items);
                thread
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                result
            }
            Err(_) => {
                let source = work.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut source = source.expect("a refused thread leaves the source here");
                here(&mut std::iter::from_fn(&mut source))
            }
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
    let work = Mutex::new(Some(sink));
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<T>(depth);
        let taken = &work;
        let thread = std::thread::Builder::new().spawn_scoped(scope, move || {
            let sink = taken.lock().unwrap_or_else(|e| e.into_inner()).take();
            let mut sink = sink?;
            for item in rx {
                if let Err(e) = sink(item) {
                    return Some(Err(e));
                }
            }
            Some(Ok(()))
        });
        match thread {
            Ok(thread) => {
                let result = {
                    let tx = tx;
                    here(&mut |item| {
                        tx.send(item)
                            .map_err(|_| crate::StageError::new("the writer stopped".to_owned()))
                    })
                };
                let sunk = thread
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                match sunk {
                    Some(Err(e)) => Err(e),
                    _ => result,
                }
            }
            Err(_) => {
                let sink = work.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut sink = sink.expect("a refused thread leaves the sink here");
                here(&mut sink)
            }
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
    fn a_source_beside_gives_its_items_in_order_and_stops_when_left() {
        let mut next = 0;
        let all: Vec<u32> = source_beside(
            2,
            move || {
                next += 1;
                (next <= 100).then_some(next)
            },
            |items| items.collect(),
        );
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
