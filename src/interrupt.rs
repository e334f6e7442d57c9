//! Ctrl-C and SIGTERM: the first asks what is running to stop cleanly, a second kills it.
//!
//! One thread per process listens for SIGINT and SIGTERM and publishes a [`Stop`] level on a
//! watch channel. Code that can stop cleanly (the scheduler of a run, the watch loop) holds an
//! [`Armed`] guard while it listens; a signal that arrives while nothing is armed ends the process
//! at once with status 130, as if no handler were installed. A third signal always does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::sync::watch;

/// How hard what is running is asked to stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Keep going.
    #[default]
    Go,
    /// Cancel: running commands get SIGTERM (then SIGKILL after a grace period), nothing new
    /// starts, nothing half-done is committed.
    Cancel,
    /// Kill running commands now and stop waiting for anything.
    Kill,
}

/// The exit status after an interrupt (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

static STOP: OnceLock<watch::Sender<Stop>> = OnceLock::new();
static ARMED: AtomicUsize = AtomicUsize::new(0);

/// Listens for SIGINT and SIGTERM (starting the listener the first time) and returns the stop
/// level they set. If signals cannot be caught, the receiver never changes and the default
/// disposition (the process ends) stays in force.
pub fn listen() -> watch::Receiver<Stop> {
    STOP.get_or_init(|| {
        let (sender, _) = watch::channel(Stop::Go);
        let publish = sender.clone();
        let signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ]);
        match signals {
            Ok(mut signals) => {
                let spawned = std::thread::Builder::new()
                    .name("imba-signals".to_owned())
                    .spawn(move || {
                        for _ in signals.forever() {
                            let next = match *publish.borrow() {
                                Stop::Go => Stop::Cancel,
                                Stop::Cancel | Stop::Kill => Stop::Kill,
                            };
                            let already_killing = *publish.borrow() == Stop::Kill;
                            if ARMED.load(Ordering::SeqCst) == 0 || already_killing {
                                std::process::exit(i32::from(EXIT_INTERRUPTED));
                            }
                            publish.send_replace(next);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start the signal listener: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot catch SIGINT/SIGTERM: {e}"),
        }
        sender
    })
    .subscribe()
}

/// While an `Armed` lives, a signal is a request published through [`listen`] rather than the end
/// of the process.
#[must_use]
pub struct Armed(());

/// Arms the handler; see [`Armed`].
pub fn arm() -> Armed {
    ARMED.fetch_add(1, Ordering::SeqCst);
    Armed(())
}

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.fetch_sub(1, Ordering::SeqCst);
    }
}
