//! The `imba` binary: all of it lives in the library; this only calls it.

/// Work a pipeline file controls (its templates) runs within a memory budget ([`imba::budget`]).
#[global_allocator]
static ALLOCATOR: imba::budget::Guarded = imba::budget::Guarded;

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    imba::cli::main()
}

/// glibc gives each thread that allocates an arena of its own, and the buffers polars' threads
/// free stay scattered across them: with one arena the monthly pipeline peaks ≈ 15% lower
/// (604 → 505 MB at Instacart scale) in the same time (`scripts/bench`). `MALLOC_ARENA_MAX`, when
/// set, still decides.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // Before any thread exists; mallopt only tunes the allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
