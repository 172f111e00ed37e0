//! `lms-api --listen HOST:PORT --lmskv-endpoints HOST:PORT,… --jwt-secret S`:
//! runs the LMS web API until SIGINT or SIGTERM.

use clap::Parser;
use lms_api::config::{Args, Config, LogFormat};
use lms_api::{seed, AppState};
use tracing_subscriber::EnvFilter;

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("LMS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => b.json().with_current_span(true).init(),
        LogFormat::Text => b.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() {
    let cfg = match Config::load(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lms-api: {e}");
            std::process::exit(2);
        }
    };
    init_logs(cfg.log_format);
    if let Err(e) = run(cfg).await {
        tracing::error!(error = %e, "lms-api stopped");
        eprintln!("lms-api: {e}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let st = AppState::new(cfg)?;
    if st.cfg.seed_demo {
        match seed::seed_demo(&st).await {
            Ok(true) => tracing::info!("demo data created"),
            Ok(false) => tracing::info!("demo data already present"),
            Err(e) => anyhow::bail!("seeding the demo failed: {e}"),
        }
    }
    lms_api::spawn_background(&st);
    tracing::info!(listen = %listener.local_addr()?, "lms-api listening");
    lms_api::serve(st, listener, shutdown_signal()).await?;
    Ok(())
}
