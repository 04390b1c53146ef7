//! The process's log: lines on standard error, or JSON on standard output,
//! through a filter that SIGHUP can replace.

use anyhow::Context as _;
use tracing_subscriber::layer::{Layered, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, reload};

use crate::config::{LogFormat, LogSection};

/// The filter when neither the config nor `RUST_LOG` gives one.
const DEFAULT_FILTER: &str = "info";

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Format = Box<dyn Layer<Filtered> + Send + Sync>;

/// The installed log's handles, to change it once the config is read and
/// on SIGHUP.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<Format, Filtered>,
}

fn text() -> Format {
    fmt::layer().with_writer(std::io::stderr).boxed()
}

fn json() -> Format {
    fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(std::io::stdout)
        .boxed()
}

/// The filter `[log] level` gives, else `RUST_LOG`, else `info`, and its
/// text.
fn filter(log: &LogSection) -> anyhow::Result<(EnvFilter, String)> {
    let text = match &log.level {
        Some(level) => level.clone(),
        None => std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_else(|_| DEFAULT_FILTER.into()),
    };
    let filter = EnvFilter::builder()
        .parse(&text)
        .with_context(|| format!("[log] level {text:?} is not a tracing filter"))?;
    Ok((filter, text))
}

impl Logging {
    /// Text on standard error through `RUST_LOG` (or `info`), until the
    /// config says otherwise.
    pub fn install() -> Logging {
        let (filter, _) = filter(&LogSection::default())
            .unwrap_or_else(|_| (EnvFilter::new(DEFAULT_FILTER), DEFAULT_FILTER.to_owned()));
        let (filter, filter_handle) = reload::Layer::new(filter);
        let (format, format_handle) = reload::Layer::new(text());
        tracing_subscriber::registry()
            .with(filter)
            .with(format)
            .init();
        Logging {
            filter: filter_handle,
            format: format_handle,
        }
    }

    /// Takes the config's format and filter (at startup).
    pub fn configure(&self, log: &LogSection) -> anyhow::Result<()> {
        if log.format == LogFormat::Json {
            self.format
                .reload(json())
                .context("cannot switch the log to JSON")?;
        }
        self.set_level(log)?;
        Ok(())
    }

    /// Takes the config's filter; returns its text.
    pub fn set_level(&self, log: &LogSection) -> anyhow::Result<String> {
        let (filter, text) = filter(log)?;
        self.filter
            .reload(filter)
            .context("cannot change the log filter")?;
        Ok(text)
    }
}
