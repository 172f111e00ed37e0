//! `lmskv`: the operator CLI of the lmskv key-value store.
//!
//! This file holds the command-line grammar (clap derive), the global flags
//! every subcommand shares, the dispatch to `cmd::<subcommand>` and the exit
//! codes: 0 on success, 1 when a command fails at run time (including a
//! missing key), 2 for a malformed command line. Every failure ends with one
//! line on stderr: `lmskv: <message>`.

mod cmd;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd::{
    kv::KvCommand, local::LocalCommand, node::NodeCommand, range::RangeCommand, status::StatusArgs,
    Context,
};
use crate::output::OutputFormat;

/// The endpoints of a cluster started by `lmskv local up` with its defaults.
const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// Operate an lmskv cluster: inspect it, read and write keys, or run one locally.
///
/// Keys and values are bytes. On the command line and in output, bytes that
/// are not printable ASCII are written `\xNN` and a backslash is written `\\`.
#[derive(Debug, Parser)]
#[command(name = "lmskv", version, about, long_about)]
struct Cli {
    /// Cluster nodes to contact (HOST:PORT, comma-separated); the client finds
    /// the leader from any of them.
    #[arg(
        long,
        global = true,
        env = "LMSKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINTS,
        value_name = "HOST:PORT[,...]"
    )]
    endpoints: Vec<String>,
    /// Output format [default: table on a terminal, json otherwise].
    #[arg(short, long, global = true, value_enum, value_name = "FORMAT")]
    output: Option<OutputFormat>,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands of `lmskv`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Show the cluster summary and the nodes and ranges one node hosts.
    Status(StatusArgs),
    /// List, split and move the leaders of ranges.
    #[command(subcommand)]
    Range(RangeCommand),
    /// List nodes or decommission one.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Read, write, delete and scan keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Run a local cluster of lmskv-node processes.
    #[command(subcommand)]
    Local(LocalCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let ctx = Context {
        endpoints: cli.endpoints,
        format: OutputFormat::resolve(cli.output),
    };
    let result = match cli.command {
        Command::Status(args) => cmd::status::run(&ctx, args).await,
        Command::Range(command) => cmd::range::run(&ctx, command).await,
        Command::Node(command) => cmd::node::run(&ctx, command).await,
        Command::Kv(command) => cmd::kv::run(&ctx, command).await,
        Command::Local(command) => cmd::local::run(&ctx, command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::error(&e.to_string());
            e.exit_code()
        }
    }
}

/// Prints help and version as clap does; turns every other parse error into
/// the one-line `lmskv: <message>` form with clap's exit code (2).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let code = u8::try_from(e.exit_code()).unwrap_or(2);
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Help on stdout, or stderr for a bare command; nothing to add.
            let _ = e.print();
        }
        _ => output::error(&format!("{} (see --help)", clap_message(&e))),
    }
    ExitCode::from(code)
}

/// The first paragraph of a clap error, without its `error:` prefix.
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let text = output::one_line(&first.join("\n"));
    text.strip_prefix("error: ").unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse_anywhere() {
        let cli = Cli::try_parse_from([
            "lmskv",
            "kv",
            "get",
            "k",
            "--endpoints",
            "a:1,b:2",
            "-o",
            "json",
        ])
        .expect("parses");
        assert_eq!(cli.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(cli.output, Some(OutputFormat::Json));
    }

    #[test]
    fn default_endpoints_are_the_local_cluster() {
        let cli = Cli::try_parse_from(["lmskv", "status"]).expect("parses");
        // LMSKV_ENDPOINTS may be set where the tests run; only check the default then.
        if std::env::var_os("LMSKV_ENDPOINTS").is_none() {
            assert_eq!(
                cli.endpoints,
                vec!["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
            );
        }
        assert_eq!(cli.output, None);
    }

    #[test]
    fn usage_errors_fit_on_one_line() {
        let e = Cli::try_parse_from(["lmskv", "kv", "get"]).expect_err("missing key");
        let msg = clap_message(&e);
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("<KEY>"), "{msg}");
        let e = Cli::try_parse_from(["lmskv", "kv", "get", "\\x00meta"]).expect_err("system key");
        assert!(
            clap_message(&e).contains("reserved"),
            "{}",
            clap_message(&e)
        );
        let e = Cli::try_parse_from(["lmskv", "local", "up", "--nodes", "16"])
            .expect_err("too many nodes");
        assert!(clap_message(&e).contains("16"), "{}", clap_message(&e));
    }
}
