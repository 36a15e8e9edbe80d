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

/// A key's share of the workers and its limits, as flags.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Its share when keys compete for workers (default 1): weight 3 gets three jobs for each one of weight 1.
    #[arg(long)]
    weight: Option<u32>,
    /// Submissions per minute (a token bucket holding a minute's worth); past it `429 rate_limited`.
    #[arg(long, conflicts_with = "no_rate_limit")]
    rate_per_minute: Option<u32>,
    /// Remove the key's submission rate limit.
    #[arg(long)]
    no_rate_limit: bool,
    /// Image-steps (n × steps) per rolling 24 hours; past it `429 compute_quota_exceeded`.
    #[arg(long, conflicts_with = "no_compute_limit")]
    daily_image_steps: Option<u64>,
    /// Remove the key's daily compute limit.
    #[arg(long)]
    no_compute_limit: bool,
}

impl LimitArgs {
    fn update(&self) -> denoised::auth::LimitsUpdate {
        denoised::auth::LimitsUpdate {
            weight: self.weight,
            rate_per_minute: if self.no_rate_limit { Some(None) } else { self.rate_per_minute.map(Some) },
            daily_image_steps: if self.no_compute_limit { Some(None) } else { self.daily_image_steps.map(Some) },
        }
    }
}

/// One line about a key's share and limits.
fn describe_limits(limits: &denoised::jobs::KeyLimits) -> String {
    let rate = limits.rate_per_minute.map_or_else(|| "unlimited".to_string(), |r| format!("{r}/min"));
    let daily = limits.daily_image_steps.map_or_else(|| "unlimited".to_string(), |d| format!("{d} image-steps/day"));
    format!("weight {}, rate {rate}, compute {daily}", limits.weight)
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
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Change a live key's weight and limits.
    Update {
        /// The key's name.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
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
        KeysAction::Create { name, admin, limits } => {
            let (mut info, key) = keys.create(&name, admin).await?;
            if !limits.update().is_empty() {
                info = keys.set_limits(&name, limits.update()).await?;
            }
            println!("created {} key `{}` (id {})", if info.admin { "admin" } else { "tenant" }, info.name, info.id);
            println!("{}", describe_limits(&info.limits));
            if !config.auth.enabled {
                println!("note: [auth] enabled is false in this config, so the server does not ask for keys yet");
            }
            println!("store it now; it cannot be shown again:");
            println!("{key}");
            Ok(())
        }
        KeysAction::List => {
            println!("{:<24} {:<14} {:<6} {:<26} {:<26} limits", "name", "id", "admin", "created", "revoked");
            for k in keys.list().await? {
                println!(
                    "{:<24} {:<14} {:<6} {:<26} {:<26} {}",
                    k.name,
                    k.id,
                    if k.admin { "yes" } else { "no" },
                    denoised::jobs::time::rfc3339_from_millis(k.created_at),
                    k.revoked_at.map_or_else(|| "-".to_string(), denoised::jobs::time::rfc3339_from_millis),
                    describe_limits(&k.limits)
                );
            }
            Ok(())
        }
        KeysAction::Update { name, limits } => {
            let info = keys.set_limits(&name, limits.update()).await?;
            println!("updated key `{}`: {}", info.name, describe_limits(&info.limits));
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
