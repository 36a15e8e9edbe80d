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
    let _ = if config.json { builder.json().try_init() } else { builder.try_init() };
}

/// The process-wide Prometheus recorder, installed on first use. Every metric is named `denoised_…`.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            let builder = builder
                .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0])
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; the handle then renders an empty page.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
