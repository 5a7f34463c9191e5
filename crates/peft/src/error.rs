//! One error type for the library. Every variant says what went wrong *and* what the user can do
//! about it, because most errors here come from files and configs a person wrote by hand.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: not a readable safetensors file ({reason}); is it truncated or corrupt?")]
    Safetensors { path: PathBuf, reason: String },

    #[error("tensor `{name}` not found in {location}{hint}")]
    MissingTensor {
        name: String,
        location: String,
        hint: String,
    },

    #[error("tensor `{name}` has shape {found:?} but the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("config: {0}")]
    Config(String),

    #[error("target modules {targets} matched no layer of the model; layers that can be adapted: {available}")]
    NoTargetMatched { targets: String, available: String },

    #[error("adapter: {0}")]
    Adapter(String),

    #[error("data: {0}")]
    Data(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("training stopped: {0}")]
    Training(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a configuration error with a formatted message.
macro_rules! config_err {
    ($($arg:tt)*) => { $crate::error::Error::Config(format!($($arg)*)) };
}
pub(crate) use config_err;
