//! Feature attributions (SHAP values) for Ferry's models, as pure functions of a graph, rows and a background.
//!
//! # Brief overview
//! - [`model::recognise`] reads an ONNX [`ModelProto`](ferry_model::onnx::ModelProto) and says what it is: a
//!   [`LinearModel`] (`ferry train`'s linear, logistic and softmax exports: one `Gemm`), an [`Ensemble`] of trees
//!   (`ai.onnx.ml` `TreeEnsembleRegressor`/`TreeEnsembleClassifier`/`TreeEnsemble`, as skl2onnx writes them), or
//!   [`Recognised::Other`] (explained by KernelSHAP). A malformed graph is a [`GraphError`], never a panic.
//! - [`linear::explain`]: exact interventional SHAP of a linear model in its `Gemm` (margin) space, no model runs.
//! - [`tree::explain`]: exact interventional TreeSHAP (what shap's `TreeExplainer(feature_perturbation=
//!   "interventional")` computes) in the ensemble's raw margin space, before its post-transform.
//! - [`kernel::explain`]: KernelSHAP for any model given as a batch closure: every coalition when features are
//!   few, paired sampling by the Shapley kernel otherwise, the perturbed rows sent in batches the caller sizes.
//!
//! Every method answers an [`Explanation`]: per explained row and per output, a base value and one attribution per
//! feature, such that base value + Σ attributions = the output for that row (exactly for the linear and tree
//! methods and exact enumeration, and by construction of the constrained regression for sampled KernelSHAP).
//!
//! The value of a coalition S is always interventional: v(S) = mean over the background rows z of f(x_S, z_S̄),
//! the model on the row taking x's values for the features in S and z's for the others.
//!
//! [`background`] reads the background sample a version keeps (`background.csv`).
//!
//! This crate knows nothing of engines, async runtimes or HTTP: the caller runs the model (for KernelSHAP) and
//! chooses the background.

pub mod background;
pub mod kernel;
pub mod linear;
pub mod model;
pub mod tree;

pub use model::{recognise, Ensemble, GraphError, LinearModel, Recognised};

/// How attributions were computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Exact SHAP of a linear model from its weights ([`linear::explain`]).
    Linear,
    /// Exact interventional TreeSHAP ([`tree::explain`]).
    TreeInterventional,
    /// KernelSHAP over every coalition: the exact Shapley values of the interventional game.
    KernelExact,
    /// KernelSHAP over sampled coalitions: an estimate, with additivity still exact.
    KernelSampled,
}

impl Method {
    /// The method's name in answers: `linear`, `tree_interventional`, `kernel_exact` or `kernel_sampled`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TreeInterventional => "tree_interventional",
            Method::KernelExact => "kernel_exact",
            Method::KernelSampled => "kernel_sampled",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The attributions of one output for one explained row.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    /// The expected output over the background (the output when no feature is known).
    pub base_value: f64,
    /// One attribution per feature, in input order; `base_value + Σ values` is the row's output.
    pub values: Vec<f64>,
}

impl Attribution {
    /// `base_value + Σ values`: the output these attributions explain.
    pub fn total(&self) -> f64 {
        self.base_value + self.values.iter().sum::<f64>()
    }
}

/// The attributions of a set of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// How they were computed.
    pub method: Method,
    /// How many background rows the base value and attributions average over.
    pub background_rows: usize,
    /// Features per row.
    pub features: usize,
    /// Outputs per row (for a classifier, one per class margin; see the method for which space).
    pub outputs: usize,
    /// `rows[r][k]`: explained row `r`, output `k`.
    pub rows: Vec<Vec<Attribution>>,
    /// Rows the model was run on (KernelSHAP); 0 for the methods that read the graph.
    pub model_rows: u64,
    /// The most coalitions evaluated for one explained row (KernelSHAP, the empty and full coalitions included);
    /// 0 for the methods that read the graph.
    pub coalitions: u64,
}

/// Why rows could not be explained (the graph itself was fine).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExplainError {
    /// A flat row-major buffer whose length is not a multiple of the row width.
    #[error("{what} has {len} values, not a whole number of rows of {features} features")]
    Shape {
        /// `rows` or `background`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The row width.
        features: usize,
    },
    /// No background rows: there is no base value to explain against.
    #[error("no background rows: attributions need a background sample to compare against")]
    NoBackground,
    /// A value the method cannot use (a NaN or an infinity where the model has no imputation).
    #[error("{what} row {row}, feature {feature} is {value}, which this model cannot take (no imputation)")]
    NotFinite {
        /// `rows` or `background`.
        what: &'static str,
        /// The row.
        row: usize,
        /// The feature.
        feature: usize,
        /// The value.
        value: f64,
    },
    /// An option out of its range.
    #[error("invalid option: {0}")]
    Options(String),
    /// The work asked for exceeds a limit.
    #[error("{what} would be {size}, beyond the limit of {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The model's answer to a batch was not what was expected.
    #[error("the model answered badly: {0}")]
    ModelOutput(String),
}

/// Checks a flat buffer of rows and returns the row count.
pub(crate) fn row_count(
    what: &'static str,
    len: usize,
    features: usize,
) -> Result<usize, ExplainError> {
    if features == 0 {
        return if len == 0 {
            Ok(0)
        } else {
            Err(ExplainError::Shape {
                what,
                len,
                features,
            })
        };
    }
    if !len.is_multiple_of(features) {
        return Err(ExplainError::Shape {
            what,
            len,
            features,
        });
    }
    Ok(len / features)
}
