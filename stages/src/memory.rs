//! What a built-in stage takes of memory on inputs of a given size: a fixed part and a part per
//! input byte, fitted to `scripts/bench`'s figures at 1× and 10× Instacart scale (each stage
//! forced alone, the whole process's peak RSS; docs/performance.md, "Memory"), with a fifth
//! more for what the measurements did not see. The orchestrator reserves it of its memory
//! budget (`--memory`) while the stage computes.

use std::path::Path;

const MB: f64 = (1u64 << 20) as f64;

/// The bytes of a file, or of the files under a folder (0 where nothing can be read).
pub fn bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| bytes(&e.path())).sum())
            .unwrap_or(0),
        _ => 0,
    }
}

/// The bytes of all these inputs.
pub fn total(inputs: &[std::path::PathBuf]) -> u64 {
    inputs.iter().map(|p| bytes(p)).sum()
}

/// `fixed_mb` MiB and `per_byte` bytes per input byte, and a fifth more.
pub fn linear(fixed_mb: f64, per_byte: f64, input: u64) -> u64 {
    ((fixed_mb * MB + per_byte * input as f64) * 1.2) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up_through_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/c"), [0u8; 5]).unwrap();
        assert_eq!(bytes(dir.path()), 15);
        assert_eq!(bytes(&dir.path().join("nope")), 0);
        assert_eq!(
            linear(1.0, 2.0, 1 << 20),
            ((3u64 << 20) as f64 * 1.2) as u64
        );
    }
}
