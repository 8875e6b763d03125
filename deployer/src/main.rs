//! `boxctl`: deploy and operate the BoxLite platform.

fn main() -> std::process::ExitCode {
    deployer::cli::main()
}
