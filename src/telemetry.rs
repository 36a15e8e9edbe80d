//! Logging set-up: `RUST_LOG`-style filters (the config's `telemetry.log` unless `RUST_LOG` is set) and a
//! JSON switch for log collectors.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::TelemetryConfig;

/// Installs the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if config.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
