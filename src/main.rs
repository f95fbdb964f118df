fn main() -> std::process::ExitCode {
    trainvisor::cli::main()
}
