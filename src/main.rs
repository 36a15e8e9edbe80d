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

/// One line about a key's watermark.
fn describe_watermark(info: &denoised::auth::KeyInfo) -> &'static str {
    match (info.has_watermark, info.watermark_on) {
        (_, true) => "watermark: on (text-to-image jobs are watermarked unless they say `\"watermark\": false`)",
        (true, false) => "watermark: off (earlier pictures are still detected)",
        (false, false) => "watermark: none",
    }
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Make a key and print it with its webhook signing secret (on a line `webhook secret: whsec_…`); the
    /// last line of the output is the key itself, shown only this once.
    Create {
        /// A name to list and revoke the key by.
        #[arg(long)]
        name: String,
        /// The key sees every tenant's jobs and `/metrics`.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        options: KeyOptions,
        #[command(flatten)]
        limits: LimitArgs,
        /// Give the key a Tree-Ring watermark and turn it on: its text-to-image jobs are watermarked unless
        /// they say `"watermark": false`, and detection can tell its pictures.
        #[arg(long)]
        watermark: bool,
    },
    /// List keys (never their secrets).
    List,
    /// Change settings of the live key with this name; only the options given change.
    Update {
        /// The key's name.
        name: String,
        #[command(flatten)]
        options: KeyOptions,
        #[command(flatten)]
        limits: LimitArgs,
        /// Remove the key's default webhook URL.
        #[arg(long, conflicts_with = "webhook_url")]
        no_webhook_url: bool,
        /// `on`: watermark the key's text-to-image jobs by default (making its watermark secret if it has
        /// none); `off`: stop by default (the secret stays, so its earlier pictures are still detected).
        #[arg(long, value_name = "on|off")]
        watermark: Option<OnOff>,
    },
    /// Give the live key with this name a new webhook signing secret and print it (`webhook secret:
    /// whsec_…`); deliveries are signed with the new one from then on, retries of earlier events included.
    RotateWebhookSecret {
        /// The key's name.
        name: String,
    },
    /// Revoke the live key with this name; its jobs stay.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// A switch on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
}

/// Settings that `keys create` sets and `keys update` changes.
#[derive(Debug, clap::Args)]
struct KeyOptions {
    /// Default webhook URL of the key's jobs (a job's own `webhook_url` wins); checked like a job's
    /// (http or https, public addresses unless `[webhooks] allow_private_targets`).
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
}

impl KeyOptions {
    /// The options as settings of a new key, the URL checked.
    async fn settings(self, config: &Config) -> anyhow::Result<denoised::auth::KeySettings> {
        Ok(denoised::auth::KeySettings { webhook_url: checked_webhook_url(config, self.webhook_url).await? })
    }
}

/// `url` checked as a webhook target (and normalised), or `None`.
async fn checked_webhook_url(config: &Config, url: Option<String>) -> anyhow::Result<Option<String>> {
    match url {
        Some(url) => {
            let checked = denoised::webhooks::target::check(&url, config.webhooks.allow_private_targets).await?;
            Ok(Some(checked.to_string()))
        }
        None => Ok(None),
    }
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
        KeysAction::Create { name, admin, options, limits, watermark } => {
            let settings = options.settings(config).await?;
            let mut created = keys.create_with(&name, admin, &settings).await?;
            if !limits.update().is_empty() {
                created.info = keys.set_limits(&name, limits.update()).await?;
            }
            if watermark {
                created.info = keys.set_watermark(&name, true).await?;
            }
            let info = &created.info;
            println!("created {} key `{}` (id {})", if info.admin { "admin" } else { "tenant" }, info.name, info.id);
            println!("{}", describe_limits(&info.limits));
            println!("{}", describe_watermark(info));
            if let Some(url) = &info.webhook_url {
                println!("default webhook URL: {url}");
            }
            println!("its jobs' webhooks are signed with this secret (give it to the receivers):");
            println!("webhook secret: {}", created.webhook_secret.reveal());
            if !config.auth.enabled {
                println!("note: [auth] enabled is false in this config, so the server does not ask for keys yet");
            }
            println!("store the key now; it cannot be shown again:");
            println!("{}", created.key);
            Ok(())
        }
        KeysAction::List => {
            println!(
                "{:<24} {:<14} {:<6} {:<26} {:<40} {:<52} {:<10} revoked",
                "name", "id", "admin", "created", "webhook", "limits", "watermark"
            );
            for k in keys.list().await? {
                let watermark = match (k.has_watermark, k.watermark_on) {
                    (_, true) => "on",
                    (true, false) => "off",
                    (false, false) => "-",
                };
                println!(
                    "{:<24} {:<14} {:<6} {:<26} {:<40} {:<52} {:<10} {}",
                    k.name,
                    k.id,
                    if k.admin { "yes" } else { "no" },
                    denoised::jobs::time::rfc3339_from_millis(k.created_at),
                    k.webhook_url.as_deref().unwrap_or("-"),
                    describe_limits(&k.limits),
                    watermark,
                    k.revoked_at.map_or_else(|| "-".to_string(), denoised::jobs::time::rfc3339_from_millis)
                );
            }
            Ok(())
        }
        KeysAction::Update { name, options, limits, no_webhook_url, watermark } => {
            let webhook_url = match checked_webhook_url(config, options.webhook_url).await? {
                Some(url) => Some(Some(url)),
                None if no_webhook_url => Some(None),
                None => None,
            };
            let changes = denoised::auth::KeyChanges { webhook_url };
            if changes.is_empty() && limits.update().is_empty() && watermark.is_none() {
                anyhow::bail!("nothing to change: give an option (see `denoised keys update --help`)");
            }
            let mut info = match changes.is_empty() {
                true => None,
                false => Some(keys.update(&name, &changes).await?),
            };
            if !limits.update().is_empty() {
                info = Some(keys.set_limits(&name, limits.update()).await?);
            }
            if let Some(switch) = watermark {
                info = Some(keys.set_watermark(&name, switch == OnOff::On).await?);
            }
            let info = info.ok_or_else(|| anyhow::anyhow!("nothing changed"))?;
            println!("updated key `{}` (id {})", info.name, info.id);
            println!("default webhook URL: {}", info.webhook_url.as_deref().unwrap_or("none"));
            println!("{}", describe_limits(&info.limits));
            println!("{}", describe_watermark(&info));
            Ok(())
        }
        KeysAction::RotateWebhookSecret { name } => {
            let (info, secret) = keys.rotate_webhook_secret(&name).await?;
            println!("key `{}` (id {}) has a new webhook secret; the old one no longer signs:", info.name, info.id);
            println!("webhook secret: {}", secret.reveal());
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
