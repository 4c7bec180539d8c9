//! `blockctl console token [--rotate]`: prints the web console's access token (creating it,
//! mode 0600, when there is none yet), or replaces it with a new one. The daemon reads the
//! file for every action, so a rotation applies at once and the old token stops working.

use std::process::ExitCode;

use blockd::console::token;

use super::EXIT_FAILED;
use crate::step::Ctx;

/// `blockctl console` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConsoleCommand {
    /// Print the access token the console's actions need (created if missing).
    Token {
        /// Replace it with a new one first; pages holding the old one are refused.
        #[arg(long)]
        rotate: bool,
    },
}

pub fn run(ctx: &Ctx, command: &ConsoleCommand) -> ExitCode {
    let ConsoleCommand::Token { rotate } = command;
    let path = ctx.config.console.token_path(&ctx.node);
    let result = if *rotate { token::rotate(&path) } else { token::read_or_create(&path) };
    match result {
        Ok(t) => {
            println!("{t}");
            if *rotate {
                eprintln!("new console token written to {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blockctl: error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
