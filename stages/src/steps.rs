//! Where a built-in's time goes: each step's wall time as a `debug` event (`imba -v` prints them).

use std::time::Instant;

/// The steps of one built-in's run, each timed from the end of the one before.
pub struct Steps {
    stage: &'static str,
    last: Instant,
    /// The steps of a part (a chunk of a file): `trace` events (`imba -vv`), not `debug`.
    part: bool,
}

impl Steps {
    /// Starts timing `stage` (the built-in's name).
    pub fn start(stage: &'static str) -> Steps {
        Steps {
            stage,
            last: Instant::now(),
            part: false,
        }
    }

    /// Starts timing a part of `stage`'s work (one of many chunks), logged at `trace` level.
    pub fn start_part(stage: &'static str) -> Steps {
        Steps {
            part: true,
            ..Steps::start(stage)
        }
    }

    /// Ends `step`: logs its time since the last step ended.
    pub fn done(&mut self, step: &str) {
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1000.0;
        if self.part {
            tracing::trace!("{}: {step} took {ms:.1} ms", self.stage);
        } else {
            tracing::debug!("{}: {step} took {ms:.1} ms", self.stage);
        }
        self.last = now;
    }
}
