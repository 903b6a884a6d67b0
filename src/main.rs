//! The `imapgate` binary: parse the command line, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    imapgate::cli::main(imapgate::cli::Cli::parse())
}
