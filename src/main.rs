//! The `imba` binary: all of it lives in the library; this only calls it.

/// Work a pipeline file controls (its templates) runs within a memory budget ([`imba::budget`]).
#[global_allocator]
static ALLOCATOR: imba::budget::Guarded = imba::budget::Guarded;

fn main() -> std::process::ExitCode {
    tune_malloc();
    imba::cli::main()
}

/// Two glibc malloc settings, each unless its environment variable is set:
/// - One arena (`MALLOC_ARENA_MAX`): glibc gives each thread that allocates an arena of its own,
///   and the buffers polars' threads free stay scattered across them: with one arena the monthly
///   pipeline peaks ≈ 15% lower (604 → 505 MB at Instacart scale) in the same time
///   (`scripts/bench`).
/// - Blocks up to 32 MiB (glibc's most) from the heap, and up to 256 MiB of freed heap kept
///   (`GLIBC_TUNABLES`): polars allocates and frees column buffers of megabytes for every chunk
///   and every range, which glibc otherwise maps and unmaps each time, and the kernel zeroes every
///   page of each new mapping on its first touch. `clean` at 10×, runs taken in turn with and
///   without: 16.1–16.5 → 15.1–15.7 s, the peak 512–530 → 521–529 MB.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Before any thread exists; mallopt only tunes the allocator.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        }
    }
}
