//! The `imba` binary: all of it lives in the library; this only calls it.

fn main() -> std::process::ExitCode {
    imba::cli::main()
}
