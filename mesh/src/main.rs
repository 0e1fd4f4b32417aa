//! `meshserve`: the operator's one binary.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::certs::CertsArgs;
use cli::infer::InferArgs;
use cli::plugin::PluginArgs;
use cli::serve::ServeArgs;
use cli::status::StatusArgs;

// Requests allocate many small, short-lived buffers across threads (bodies, tensors, header
// maps): glibc's arenas spent about a tenth of a loaded node's CPU in malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meshserve",
    version,
    about = "A model-serving mesh: ONNX Runtime behind the Open Inference Protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP/1.1 and HTTP/2, and HTTP/3 when asked (the default: the bundled
    /// models on 127.0.0.1:8000).
    Serve(ServeArgs),
    /// Create a mesh CA (if the folder has none) and issue node, client and server certificates.
    Certs(CertsArgs),
    /// Show the mesh as one node sees it: members, their load, and where each model is served.
    Status(StatusArgs),
    /// Send requests to a model or an endpoint over HTTP/3 or meshserve/1, and print each
    /// answer and the route it took.
    Infer(InferArgs),
    /// For plugin authors: run one component in the node's sandbox without a node.
    Plugin(PluginArgs),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, which is what an operator reads.
            eprintln!("meshserve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    meshserve::process::init_logging();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => cli::serve::serve(args),
        Command::Certs(args) => cli::certs::certs(args),
        Command::Status(args) => cli::status::status(args),
        Command::Infer(args) => cli::infer::infer(args),
        Command::Plugin(args) => cli::plugin::plugin(args),
    }
}
