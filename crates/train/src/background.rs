//! Background data: a small seeded sample of training rows kept with a model version as `background.csv`, the
//! reference rows feature attributions (explanations) are measured against.
//!
//! The format: a header line of the feature names in the model's input order (those of `ferry.json`'s `features`),
//! then one line per row of raw feature values as the graph takes them (before any standardization; a missing value
//! is an empty field), at most [`MAX_BACKGROUND_ROWS`] rows. Numbers are written in Rust's shortest round-trip form,
//! so parsing them gives back the same `f64` (and so the same `f32`).
//!
//! [`sample_rows`] draws the rows, [`from_dataset`] takes them from a [`Dataset`]; the format, [`Background`], writing and reading it
//! are `ferry-explain`'s (the server reads the file with it), [`read_background`] reads one as a training error.

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::Dataset;
use crate::TrainError;

pub use ferry_explain::background::{
    Background, BACKGROUND_FILE, MAX_BACKGROUND_BYTES, MAX_BACKGROUND_ROWS,
};

/// The rows `ferry train` and `ferry baseline` keep unless told otherwise.
pub const DEFAULT_BACKGROUND_ROWS: usize = 100;

/// A seeded sample of `n` of `candidates` (all of them when there are fewer), in ascending order.
///
/// The draw uses its own ChaCha8 stream of `seed` (stream 1; training uses stream 0), so it neither depends on
/// nor disturbs the training's draws, and the same candidates, `n` and seed always give the same rows.
pub fn sample_rows(candidates: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut rows: Vec<usize> = if n >= candidates.len() {
        candidates.to_vec()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        rand::seq::index::sample(&mut rng, candidates.len(), n)
            .into_iter()
            .map(|i| candidates[i])
            .collect()
    };
    rows.sort_unstable();
    rows
}

/// The rows `rows` of `dataset`, as the file gave them (cells that were missing and imputed are NaN again).
pub fn from_dataset(dataset: &Dataset, rows: &[usize]) -> Background {
    let f = dataset.features.len();
    let mut values = Vec::with_capacity(rows.len() * f);
    for &r in rows {
        values.extend((0..f).map(|c| dataset.raw_value(r, c)));
    }
    Background {
        features: dataset.features.clone(),
        rows: rows.len(),
        values,
    }
}

/// A seeded sample of up to `n` of `dataset`'s rows `candidates` (see [`sample_rows`]); `None` when `n` is 0
/// or there are no candidates.
pub fn sample(dataset: &Dataset, candidates: &[usize], n: usize, seed: u64) -> Option<Background> {
    let n = n.min(MAX_BACKGROUND_ROWS);
    (n > 0 && !candidates.is_empty())
        .then(|| from_dataset(dataset, &sample_rows(candidates, n, seed)))
}

/// Reads and checks a `background.csv` ([`ferry_explain::background::read`]) as a training error.
pub fn read_background(path: &Path) -> Result<Background, TrainError> {
    ferry_explain::background::read(path).map_err(|e| match e {
        ferry_explain::background::BackgroundError::Io { source, .. } => {
            TrainError::io(path, source)
        }
        ferry_explain::background::BackgroundError::Format { message, .. } => TrainError::Data {
            path: path.to_path_buf(),
            message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_csv, LoadOptions};
    use crate::Impute;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-background-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn samples_are_seeded_and_drawn_from_the_candidates() {
        let candidates: Vec<usize> = (0..500).filter(|i| i % 3 != 0).collect();
        let a = sample_rows(&candidates, 100, 7);
        assert_eq!(a.len(), 100);
        assert_eq!(a, sample_rows(&candidates, 100, 7));
        assert_ne!(a, sample_rows(&candidates, 100, 8));
        assert!(a.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
        assert!(a.iter().all(|r| candidates.contains(r)));
        // Fewer candidates than asked for: all of them.
        assert_eq!(sample_rows(&[4, 2, 9], 100, 7), vec![2, 4, 9]);
    }

    #[test]
    fn a_sample_of_a_dataset_keeps_raw_values_and_missing_cells() {
        let dir = scratch("dataset");
        let data = dir.join("data.csv");
        std::fs::write(&data, "a,b,y\n1.5,,0\n2,20,1\n,30,0\n4,0.1,1\n").unwrap();
        let options = LoadOptions {
            impute: Some(Impute::Mean),
            ..Default::default()
        };
        let dataset = load_csv(&data, &options).unwrap();
        assert!(!dataset.x[[0, 1]].is_nan(), "imputed in the matrix");
        let all = sample(&dataset, &[0, 1, 2, 3], 100, 0).unwrap();
        assert_eq!(all.features, ["a", "b"]);
        assert_eq!(all.rows, 4);
        assert_eq!(all.row(0)[0], 1.5);
        assert!(all.row(0)[1].is_nan());
        assert!(all.row(2)[0].is_nan());
        assert_eq!(all.row(3), [4.0, 0.1]);
        // A subset keeps track of which cells were missing.
        let sub = dataset.subset(&[2, 3]);
        let from_sub = from_dataset(&sub, &[0, 1]);
        assert!(from_sub.row(0)[0].is_nan());
        assert_eq!(from_sub.row(1), [4.0, 0.1]);
        assert!(sample(&dataset, &[0, 1], 0, 0).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
