//! [`TrainError`], the one error type of the training crate: bad data, bad settings, export and engine failures.

use std::path::PathBuf;

/// What can go wrong while loading data, training, exporting or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CSV file is malformed or holds a value that cannot be used; the message names the line and column.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The settings do not fit together or do not fit the data.
    #[error("{0}")]
    Config(String),
    /// Training diverged (a loss became infinite or NaN).
    #[error("training diverged at epoch {epoch} (loss {loss}); lower the learning rate")]
    Diverged {
        /// The epoch at which the loss stopped being finite.
        epoch: usize,
        /// The loss it reached.
        loss: f64,
    },
    /// A model directory's `ferry.json` is missing or unreadable.
    #[error("{path}: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The inference engine failed to load or run the exported model.
    #[error("engine: {0}")]
    Engine(#[from] ferry_engine::EngineError),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
