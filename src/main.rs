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
        /// What this process does: all (API and workers), api (no models, no jobs) or worker (jobs; only
        /// health and metrics over HTTP). Overrides server.role (also DENOISED_SERVER__ROLE).
        #[arg(long)]
        role: Option<denoised::config::Role>,
        /// Listen address (overrides server.bind).
        #[arg(long)]
        bind: Option<String>,
        /// Data folder (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Database URL (overrides storage.database_url).
        #[arg(long)]
        database_url: Option<String>,
        /// Serve without API keys on a non-loopback address (refused otherwise).
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Manage API keys (stored, hashed, in the server's database).
    Keys {
        /// Configuration file (the database is `storage.database_url`).
        #[arg(long, short, default_value = "config.toml", env = "DENOISED_CONFIG", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: KeysAction,
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

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Make a key and print it; the last line of the output is the key itself, shown only this once.
    Create {
        /// A name to list and revoke the key by.
        #[arg(long)]
        name: String,
        /// The key sees every tenant's jobs and `/metrics`.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke the live key with this name; its jobs stay.
    Revoke {
        /// The key's name.
        name: String,
    },
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
        Command::Keys { config, action } => {
            let config = Config::load(&config, std::env::vars(), &Overrides::default())?;
            tokio::runtime::Runtime::new()?.block_on(keys(&config, action))
        }
        Command::Serve { config, role, bind, data_dir, database_url, allow_unauthenticated } => {
            let overrides = Overrides { role, bind, data_dir, database_url, allow_unauthenticated };
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

async fn keys(config: &Config, action: KeysAction) -> anyhow::Result<()> {
    let store = denoised::jobs::JobStore::connect(&config.storage.database_url).await?;
    let keys = denoised::auth::KeyStore::new(&store);
    let result = match action {
        KeysAction::Create { name, admin } => {
            let (info, key) = keys.create(&name, admin).await?;
            println!("created {} key `{}` (id {})", if info.admin { "admin" } else { "tenant" }, info.name, info.id);
            if !config.auth.enabled {
                println!("note: [auth] enabled is false in this config, so the server does not ask for keys yet");
            }
            println!("store it now; it cannot be shown again:");
            println!("{key}");
            Ok(())
        }
        KeysAction::List => {
            println!("{:<24} {:<14} {:<6} {:<26} revoked", "name", "id", "admin", "created");
            for k in keys.list().await? {
                println!(
                    "{:<24} {:<14} {:<6} {:<26} {}",
                    k.name,
                    k.id,
                    if k.admin { "yes" } else { "no" },
                    denoised::jobs::time::rfc3339_from_millis(k.created_at),
                    k.revoked_at.map_or_else(|| "-".to_string(), denoised::jobs::time::rfc3339_from_millis)
                );
            }
            Ok(())
        }
        KeysAction::Revoke { name } => {
            let info = keys.revoke(&name).await?;
            let cancelled = store.cancel_queued_of(&info.id).await?;
            println!("revoked key `{}` (id {}); cancelled its {cancelled} queued jobs", info.name, info.id);
            println!("its running jobs stop at the server's next lease renewal");
            Ok(())
        }
    };
    store.close().await;
    result
}
