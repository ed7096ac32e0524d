//! Exact interventional SHAP for a linear model, in its `Gemm` (margin) space.
//!
//! For margin k = Σ_j W_kj x̃_j + b_k, the Shapley value of feature j in the interventional game (features not
//! in a coalition take the background's values) is φ_kj = W_kj (x̃_j − E[z̃_j]), and the base value is
//! Σ_j W_kj E[z̃_j] + b_k, with E the mean over the background rows. This is what shap's `LinearExplainer`
//! computes with `feature_perturbation="interventional"`. No model runs are needed.
//!
//! x̃ and z̃ are the rows after the graph's imputation: when the graph replaces NaN inputs by fill values
//! (`IsNaN` → `Where`), a NaN in an explained or background row counts as its fill value, so a missing feature
//! is attributed as if it had been sent with the fill value. Without imputation a NaN or infinite value is an
//! error (the model's own output would be NaN).
//!
//! For classifiers the attributions are per logit (the `Gemm` output before the softmax or sigmoid; see
//! [`LinearSpace`](crate::model::LinearSpace)), never per probability.

use crate::model::LinearModel;
use crate::{row_count, Attribution, ExplainError, Explanation, Method};

/// Rows after imputation, each value checked finite.
fn imputed_rows(
    model: &LinearModel,
    what: &'static str,
    rows: &[f64],
) -> Result<Vec<Vec<f64>>, ExplainError> {
    let count = row_count(what, rows.len(), model.features)?;
    (0..count)
        .map(|r| {
            let row = model.imputed(&rows[r * model.features..(r + 1) * model.features]);
            match row.iter().position(|v| !v.is_finite()) {
                Some(feature) => Err(ExplainError::NotFinite {
                    what,
                    row: r,
                    feature,
                    value: row[feature],
                }),
                None => Ok(row),
            }
        })
        .collect()
}

/// Explains `rows` (row-major, `model.features` values each) against `background` (same layout).
pub fn explain(
    model: &LinearModel,
    rows: &[f64],
    background: &[f64],
) -> Result<Explanation, ExplainError> {
    let features = model.features;
    let explained = imputed_rows(model, "rows", rows)?;
    let reference = imputed_rows(model, "background", background)?;
    if reference.is_empty() {
        return Err(ExplainError::NoBackground);
    }
    let n = reference.len() as f64;
    let mean: Vec<f64> = (0..features)
        .map(|j| reference.iter().map(|z| z[j]).sum::<f64>() / n)
        .collect();
    let weights = |k: usize| &model.weights[k * features..(k + 1) * features];
    let base: Vec<f64> = (0..model.outputs)
        .map(|k| {
            model.bias[k]
                + weights(k)
                    .iter()
                    .zip(&mean)
                    .map(|(w, m)| w * m)
                    .sum::<f64>()
        })
        .collect();
    let rows = explained
        .iter()
        .map(|x| {
            (0..model.outputs)
                .map(|k| Attribution {
                    base_value: base[k],
                    values: weights(k)
                        .iter()
                        .zip(x.iter().zip(&mean))
                        .map(|(w, (x, m))| w * (x - m))
                        .collect(),
                })
                .collect()
        })
        .collect();
    Ok(Explanation {
        method: Method::Linear,
        background_rows: reference.len(),
        features,
        outputs: model.outputs,
        rows,
        model_rows: 0,
        coalitions: 0,
    })
}
