//! A memory budget for work a pipeline file controls: rendering its templates.
//!
//! minijinja bounds the steps a template takes (fuel), not the size of the values it builds: one
//! expression such as `('x' * 100000000) ~ ('x' * 100000000) ~ …` takes a handful of steps and
//! gigabytes. [`within`] runs a closure with a budget for the bytes the current thread
//! allocates; the binary's global allocator ([`Guarded`]) charges every allocation of a thread
//! that has one, and a thread that goes over is stopped with a clear message and exit status 2
//! (a config error) before the allocation happens. Without the binary's allocator (the
//! library's own tests) budgets cost nothing and stop nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The bytes one template render may hold at once.
pub const TEMPLATE_BYTES: usize = 256 << 20;

thread_local! {
    /// (bytes allocated, limit) while a budget is in force on this thread.
    static BUDGET: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    /// Where the work is, for the message: set by [`within`].
    static WHERE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Runs `work` with at most `limit` bytes allocated by this thread at a time. `place` names the
/// work in the message printed when it goes over (the file and line of a template).
pub fn within<R>(limit: usize, place: &str, work: impl FnOnce() -> R) -> R {
    let message = format!(
        "error: {place} builds a value larger than {} MiB; imba stopped\n",
        limit >> 20
    );
    let outer = BUDGET.with(|b| b.replace(Some((0, limit))));
    let outer_where = WHERE.with(|w| w.replace((message.as_ptr(), message.len())));
    let result = work();
    BUDGET.with(|b| b.set(outer));
    WHERE.with(|w| w.set(outer_where));
    drop(message);
    result
}

/// Charges `size` bytes to the thread's budget; stops the process when it is spent.
fn charge(size: usize) {
    let _ = BUDGET.try_with(|b| {
        if let Some((used, limit)) = b.get() {
            let used = used.saturating_add(size);
            if used > limit {
                stop();
            }
            b.set(Some((used, limit)));
        }
    });
}

fn refund(size: usize) {
    let _ = BUDGET.try_with(|b| {
        if let Some((used, limit)) = b.get() {
            b.set(Some((used.saturating_sub(size), limit)));
        }
    });
}

/// Writes the message set by [`within`] and exits with status 2, allocating nothing.
fn stop() -> ! {
    let (ptr, len) = WHERE.try_with(|w| w.get()).unwrap_or((std::ptr::null(), 0));
    // SAFETY: `ptr..ptr+len` is the message `within` keeps alive until the budget ends, and this
    // runs only while the budget is in force; write(2) and _exit(2) allocate nothing.
    unsafe {
        if !ptr.is_null() {
            libc::write(2, ptr.cast(), len);
        }
        libc::_exit(2)
    }
}

/// The system allocator, charging each allocation to the thread's budget when it has one.
pub struct Guarded;

// SAFETY: every call is forwarded to `System` with the same arguments; the budget only counts.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            refund(layout.size() - new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
