//! The `denoised` command line. Everything interesting lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use denoised::config::{Config, Overrides};

/// HTTP inference server for diffusion image generation on ONNX Runtime.
#[derive(Debug, Parser)]
#[command(name = "denoised", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configured models over HTTP.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = "config.toml", env = "DENOISED_CONFIG")]
        config: PathBuf,
        /// Listen address (overrides server.bind).
        #[arg(long)]
        bind: Option<String>,
        /// Data folder (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Database URL (overrides storage.database_url).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Check the configuration and every model folder without serving.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = "config.toml", env = "DENOISED_CONFIG")]
        config: PathBuf,
    },
    /// Print the OpenAPI document.
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&denoised::api::openapi())?);
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config, std::env::vars(), &Overrides::default())?;
            let registry = denoised::models::ModelRegistry::load(&config.models)?;
            for model in registry.all() {
                println!(
                    "{}: {} ({}x{}, {})",
                    model.name,
                    model.info.path.display(),
                    model.info.native_size,
                    model.info.native_size,
                    model.info.default_scheduler.name()
                );
            }
            Ok(())
        }
        Command::Serve { config, bind, data_dir, database_url } => {
            let overrides = Overrides { bind, data_dir, database_url };
            let config = Config::load(&config, std::env::vars(), &overrides)?;
            denoised::telemetry::init(&config.telemetry);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let server = denoised::server::Server::start(&config).await?;
                server.run(denoised::server::shutdown_signal()).await
            })
        }
    }
}
