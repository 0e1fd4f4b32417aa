//! `meshserve plugin`: what a plugin author runs, from an empty folder to a served endpoint.
//! `new` writes a project that builds and tests as it is, `build` makes its component and
//! says what it exports, `run` calls one component in the node's own sandbox without a node,
//! and `watch` rebuilds on every change and swaps the new version into a running node.

mod build;
mod new;
mod run;
mod watch;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
pub(crate) struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin project (Rust or Python) that builds, tests and serves as it is.
    New(new::NewArgs),
    /// Build the plugin project in DIR (a Rust crate, or a Python `app.py`) into a component
    /// and say what it is and exports.
    Build(build::BuildArgs),
    /// Call one component in the node's sandbox, without a model or a node, and print its
    /// tensors or reply, its time, and the limit it hit if it failed.
    Run(run::RunArgs),
    /// Build the project in DIR, then again on every change to its sources; with
    /// `--endpoint`, swap each new build into a running node at once.
    Watch(watch::WatchArgs),
}

pub(crate) fn plugin(args: PluginArgs) -> Result<()> {
    match args.command {
        PluginCommand::New(args) => new::new(args),
        PluginCommand::Build(args) => build::build(&args.dir).map(|_| ()),
        PluginCommand::Run(args) => run::run(args),
        PluginCommand::Watch(args) => watch::watch(args),
    }
}
