//! What a graph is, for explaining it: a linear function ([`LinearModel`]), a tree ensemble ([`Ensemble`]) or
//! something else ([`Recognised::Other`], explained by KernelSHAP).
//!
//! Recognition reads only the graph's nodes, attributes and initializers (never external data files). A graph
//! that does not have a recognised shape is `Other`, with the reason; a graph that has the shape but is broken
//! (a child index out of range, a cycle, weights whose size disagrees with their dimensions) is a [`GraphError`].
//! Work and memory stay proportional to the graph's own size: sizes a file merely states (dimensions, counts of
//! targets or features) are checked against the data present or bounded by [`MAX_OUTPUTS`] and [`MAX_FEATURES`]
//! before anything is allocated from them, and trees are walked without recursion.

use std::collections::{HashMap, HashSet};

use ferry_model::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

/// The most outputs (targets or classes) a recognised model may have.
pub const MAX_OUTPUTS: usize = 4096;
/// The most features a recognised model may read.
pub const MAX_FEATURES: usize = 1 << 16;
/// The most elements a tensor's dimensions may announce.
const MAX_TENSOR_ELEMENTS: u64 = 1 << 28;
/// How deep constant folding follows `DequantizeLinear` inputs.
const MAX_CONSTANT_DEPTH: usize = 4;
/// The `ai.onnx.ml` domain.
const ML_DOMAIN: &str = "ai.onnx.ml";

/// A graph that has a recognised shape but cannot be what it claims.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// The model has no graph.
    #[error("the model has no graph")]
    NoGraph,
    /// A node whose attributes or inputs are inconsistent.
    #[error("node {node:?} ({op}): {message}")]
    Node {
        /// The node's name.
        node: String,
        /// Its operator.
        op: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor whose data does not match its type or dimensions.
    #[error("tensor {name:?}: {message}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A size beyond what this crate explains.
    #[error("{what} is {size}, beyond the limit of {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A well-formed feature this crate does not read (external data, `BRANCH_MEMBER` splits, `MIN`/`MAX`
    /// aggregation...). [`recognise`] answers [`Recognised::Other`] with this text instead.
    #[error("{0}")]
    Unsupported(String),
}

fn node_error(node: &NodeProto, message: impl Into<String>) -> GraphError {
    GraphError::Node {
        node: node.name.clone(),
        op: node.op_type.clone(),
        message: message.into(),
    }
}

fn tensor_error(t: &TensorProto, message: impl Into<String>) -> GraphError {
    GraphError::Tensor {
        name: t.name.clone(),
        message: message.into(),
    }
}

/// What a graph is.
#[derive(Debug, Clone, PartialEq)]
pub enum Recognised {
    /// One `Gemm` of constant weights on the (optionally imputed) input: exact linear attributions.
    Linear(LinearModel),
    /// An `ai.onnx.ml` tree ensemble on the input: exact interventional TreeSHAP.
    Trees(Ensemble),
    /// Anything else: KernelSHAP, with the reason the exact methods do not apply.
    Other {
        /// Why the graph is neither linear nor a tree ensemble.
        reason: String,
    },
}

/// Which value of the graph a linear model's attributions are in: always the `Gemm`'s output (the margin); this
/// says how the graph's outputs relate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinearSpace {
    /// The `Gemm`'s output is the graph output `output` itself (a regression): attributions are in output space.
    Output {
        /// The graph output.
        output: String,
    },
    /// The graph output `probabilities` is the softmax of the `Gemm`'s output `logits` (`ferry train`'s
    /// classifiers): attributions are per logit, not per probability.
    Softmax {
        /// The `Gemm`'s output.
        logits: String,
        /// The graph output.
        probabilities: String,
    },
    /// The graph output `probabilities` is the logistic sigmoid of the `Gemm`'s output `logits`.
    Sigmoid {
        /// The `Gemm`'s output.
        logits: String,
        /// The graph output.
        probabilities: String,
    },
    /// The `Gemm`'s output `margin` is not a graph output and feeds no softmax or sigmoid that is (only `ArgMax`
    /// and the like): attributions are in that value's space.
    Margin {
        /// The `Gemm`'s output.
        margin: String,
    },
}

/// A linear function of the input: margin = W · x̃ + b, with x̃ the input after imputation.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Features per row.
    pub features: usize,
    /// Margins per row (the `Gemm`'s output columns).
    pub outputs: usize,
    /// W as `[outputs, features]`, row-major, with the `Gemm`'s `alpha` applied and `transB` undone.
    pub weights: Vec<f64>,
    /// b, one per output, with the `Gemm`'s `beta` applied.
    pub bias: Vec<f64>,
    /// The `Gemm`'s `transB` flag as the graph stored it (B was `[outputs, features]` when set).
    pub trans_b: bool,
    /// The fill value per feature when the graph replaces NaN inputs (`IsNaN` → `Where`) before the `Gemm`.
    pub impute: Option<Vec<f64>>,
    /// How the graph's outputs relate to the margin the attributions are in.
    pub space: LinearSpace,
    /// Two outputs of which the first is identically 0 (W's first row and b's first value zero): `ferry train`'s
    /// binary logistic export (0, z), whose second margin z is the log-odds of the second class.
    pub binary_pair: bool,
}

impl LinearModel {
    /// The row after imputation: NaN replaced by the fill value when the graph imputes.
    pub fn imputed(&self, row: &[f64]) -> Vec<f64> {
        match &self.impute {
            Some(fill) => row
                .iter()
                .zip(fill)
                .map(|(&v, &f)| if v.is_nan() { f } else { v })
                .collect(),
            None => row.to_vec(),
        }
    }

    /// The margins of one row of `features` values (imputation applied).
    pub fn margin(&self, row: &[f64]) -> Vec<f64> {
        let x = self.imputed(row);
        self.weights
            .chunks_exact(self.features.max(1))
            .zip(&self.bias)
            .map(|(w, b)| b + w.iter().zip(&x).map(|(w, x)| w * x).sum::<f64>())
            .collect()
    }
}

/// A split's comparison: the true branch is taken when `x MODE threshold` holds (or x is NaN and missing values
/// track the true branch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `x <= threshold`.
    Leq,
    /// `x < threshold`.
    Lt,
    /// `x >= threshold`.
    Gte,
    /// `x > threshold`.
    Gt,
    /// `x == threshold`.
    Eq,
    /// `x != threshold`.
    Neq,
}

impl Mode {
    fn from_name(name: &[u8]) -> Option<Option<Mode>> {
        Some(Some(match name {
            b"BRANCH_LEQ" => Mode::Leq,
            b"BRANCH_LT" => Mode::Lt,
            b"BRANCH_GTE" => Mode::Gte,
            b"BRANCH_GT" => Mode::Gt,
            b"BRANCH_EQ" => Mode::Eq,
            b"BRANCH_NEQ" => Mode::Neq,
            b"LEAF" => return Some(None),
            _ => return None,
        }))
    }

    fn from_code(code: f64) -> Option<Mode> {
        if code.fract() != 0.0 || !code.is_finite() {
            return None;
        }
        Some(match code as i64 {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            _ => return None,
        })
    }

    /// Whether `x` takes the true branch of a split on `threshold`, as ONNX Runtime decides it: the comparison
    /// (false for NaN except `Neq`), or NaN when missing values track the true branch.
    pub fn goes_true(self, x: f64, threshold: f64, missing_tracks_true: bool) -> bool {
        let holds = match self {
            Mode::Leq => x <= threshold,
            Mode::Lt => x < threshold,
            Mode::Gte => x >= threshold,
            Mode::Gt => x > threshold,
            Mode::Eq => x == threshold,
            Mode::Neq => x != threshold,
        };
        holds || (missing_tracks_true && x.is_nan())
    }
}

/// One node of a [`Tree`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Node {
    /// A split on one feature.
    Branch {
        /// The feature compared.
        feature: u32,
        /// The threshold.
        threshold: f64,
        /// The comparison.
        mode: Mode,
        /// Whether a NaN feature takes the true branch.
        missing_tracks_true: bool,
        /// The index in [`Tree::nodes`] of the true branch.
        yes: u32,
        /// The index of the false branch.
        no: u32,
    },
    /// A leaf: its values are `Tree::leaf_values[start..end]`.
    Leaf {
        /// First value.
        start: u32,
        /// One past the last value.
        end: u32,
    },
}

/// One tree: acyclic, every child index in range, the root at index 0, each node reached by exactly one path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tree {
    /// The nodes, the root first.
    pub nodes: Vec<Node>,
    /// The leaves' values as (output, weight) pairs; a leaf may add to several outputs, or to none.
    pub leaf_values: Vec<(u32, f64)>,
}

impl Tree {
    /// The leaf a row reaches.
    pub fn leaf(&self, row: &[f64]) -> &[(u32, f64)] {
        let mut i = 0usize;
        loop {
            match self.nodes[i] {
                Node::Branch {
                    feature,
                    threshold,
                    mode,
                    missing_tracks_true,
                    yes,
                    no,
                } => {
                    let x = row[feature as usize];
                    i = if mode.goes_true(x, threshold, missing_tracks_true) {
                        yes
                    } else {
                        no
                    } as usize;
                }
                Node::Leaf { start, end } => {
                    return &self.leaf_values[start as usize..end as usize]
                }
            }
        }
    }
}

/// How tree outputs combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The sum over trees (gradient boosting; skl2onnx's random forest classifiers, whose weights are already
    /// divided by the number of trees).
    Sum,
    /// The mean over trees (skl2onnx's random forest regressors).
    Average,
}

/// The transform from raw margins to the graph's output; attributions are always in the raw margin space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostTransform {
    /// The margins are the output.
    None,
    /// Softmax over outputs.
    Softmax,
    /// The logistic sigmoid per output.
    Logistic,
    /// Softmax leaving zero margins at zero.
    SoftmaxZero,
    /// The probit function.
    Probit,
}

impl PostTransform {
    fn from_name(name: &[u8]) -> Option<PostTransform> {
        Some(match name {
            b"" | b"NONE" => PostTransform::None,
            b"SOFTMAX" => PostTransform::Softmax,
            b"LOGISTIC" => PostTransform::Logistic,
            b"SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            b"PROBIT" => PostTransform::Probit,
            _ => return None,
        })
    }
}

/// Whether an ensemble regresses or classifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnsembleKind {
    /// `TreeEnsembleRegressor` or `TreeEnsemble`: one margin per target.
    Regressor,
    /// `TreeEnsembleClassifier`: one margin per class, or one margin in all when `binary_single_column`.
    Classifier {
        /// The class labels (integer labels written in decimal).
        labels: Vec<String>,
        /// Two classes whose leaves all score class id 0 alone (skl2onnx's binary gradient boosting): the single
        /// margin is the score of the second class, `labels[1]` (ONNX Runtime outputs it as
        /// (post(−m), post(m)) or (1 − m, m)).
        binary_single_column: bool,
    },
}

/// A tree ensemble: raw margin k of a row = aggregate over trees of the leaf values for k, plus `base_values[k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    /// The operator it came from.
    pub op: String,
    /// Features per row (the graph input's width when known, else one past the highest feature split on).
    pub features: usize,
    /// Raw margins per row.
    pub outputs: usize,
    /// The trees, in the order ONNX Runtime sums them. For the legacy operators a tree is a contiguous run of
    /// nodes with one tree id, rooted at its first node (as ONNX Runtime reads them).
    pub trees: Vec<Tree>,
    /// Added to each margin after aggregation (zeros when the graph has none).
    pub base_values: Vec<f64>,
    /// Sum or mean over trees.
    pub aggregate: Aggregate,
    /// What the graph applies to the margins after (not part of the attributions' space).
    pub post_transform: PostTransform,
    /// Regressor or classifier.
    pub kind: EnsembleKind,
}

impl Ensemble {
    /// The raw margins of one row (before the post-transform).
    pub fn raw(&self, row: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.outputs];
        for tree in &self.trees {
            for &(k, v) in tree.leaf(row) {
                out[k as usize] += v;
            }
        }
        let scale = self.tree_scale();
        out.iter_mut()
            .zip(&self.base_values)
            .for_each(|(o, b)| *o = *o * scale + b);
        out
    }

    /// The factor applied to the sum over trees: 1, or 1 / trees for [`Aggregate::Average`].
    pub fn tree_scale(&self) -> f64 {
        match self.aggregate {
            Aggregate::Sum => 1.0,
            Aggregate::Average => 1.0 / self.trees.len().max(1) as f64,
        }
    }

    /// Nodes over all trees (a measure of the cost of explaining one row against one background row).
    pub fn node_count(&self) -> usize {
        self.trees.iter().map(|t| t.nodes.len()).sum()
    }

    /// Reads an `ai.onnx.ml` `TreeEnsembleRegressor`, `TreeEnsembleClassifier` or `TreeEnsemble` node.
    pub fn from_node(node: &NodeProto) -> Result<Ensemble, GraphError> {
        if node.domain != ML_DOMAIN {
            return Err(node_error(node, "not in the ai.onnx.ml domain"));
        }
        match node.op_type.as_str() {
            "TreeEnsembleRegressor" | "TreeEnsembleClassifier" => legacy_ensemble(node),
            "TreeEnsemble" => opset5_ensemble(node),
            _ => Err(node_error(node, "not a tree ensemble")),
        }
    }
}

/// Says what `model` is. A graph of no recognised shape is `Other` (never an error); a graph of a recognised
/// shape that is malformed is an error.
pub fn recognise(model: &ModelProto) -> Result<Recognised, GraphError> {
    let graph = model.graph.as_ref().ok_or(GraphError::NoGraph)?;
    let other = |reason: String| Ok(Recognised::Other { reason });
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let [input] = inputs[..] else {
        return other(format!(
            "the graph has {} inputs; the exact methods need one [rows, features] input",
            inputs.len()
        ));
    };
    let dims = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .map(|s| s.dim.iter().map(|d| d.dim_value).collect::<Vec<_>>());
    let width = match dims.as_deref() {
        None => None,
        Some([_, Some(f)]) if *f >= 0 => Some(*f as u64),
        Some([_, _]) => None,
        Some(d) => {
            return other(format!(
                "the input {:?} has rank {}, not [rows, features]",
                input.name,
                d.len()
            ))
        }
    };
    let trees: Vec<&NodeProto> = graph
        .node
        .iter()
        .filter(|n| {
            n.domain == ML_DOMAIN
                && matches!(
                    n.op_type.as_str(),
                    "TreeEnsembleRegressor" | "TreeEnsembleClassifier" | "TreeEnsemble"
                )
        })
        .collect();
    match trees[..] {
        [] => linear(graph, &input.name, width),
        [node] => {
            if !reads_input(graph, node, &input.name) {
                return other(format!(
                    "the tree ensemble {:?} reads a transformed input, not {:?}",
                    node.name, input.name
                ));
            }
            let mut ensemble = match Ensemble::from_node(node) {
                Ok(e) => e,
                Err(GraphError::Unsupported(reason)) => return other(reason),
                Err(e) => return Err(e),
            };
            if let Some(width) = width {
                if width < ensemble.features as u64 {
                    return Err(node_error(
                        node,
                        format!(
                            "splits on feature {} of an input of {width} features",
                            ensemble.features - 1
                        ),
                    ));
                }
                if width > MAX_FEATURES as u64 {
                    return Err(GraphError::TooLarge {
                        what: "the input width",
                        size: width,
                        limit: MAX_FEATURES as u64,
                    });
                }
                ensemble.features = width as usize;
            }
            Ok(Recognised::Trees(ensemble))
        }
        _ => other(format!("the graph has {} tree ensembles", trees.len())),
    }
}

/// Whether `node` reads the graph input `input` itself, or through `Cast` to a float type and `Identity` only.
fn reads_input(graph: &GraphProto, node: &NodeProto, input: &str) -> bool {
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let Some(mut name) = node.input.first().map(String::as_str) else {
        return false;
    };
    for _ in 0..=graph.node.len() {
        if name == input {
            return true;
        }
        let Some(p) = producers.get(name) else {
            return false;
        };
        let passes = p.domain.is_empty()
            && match p.op_type.as_str() {
                "Identity" => true,
                "Cast" => attribute(p, "to").is_some_and(|a| a.i == 1 || a.i == 11),
                _ => false,
            };
        match (passes, p.input.first()) {
            (true, Some(next)) => name = next,
            _ => return false,
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------------------------
// Tensors and constants

/// A constant tensor's values as f64.
#[derive(Debug, Clone, PartialEq)]
struct Dense {
    dims: Vec<usize>,
    values: Vec<f64>,
}

fn element_count(t: &TensorProto) -> Result<usize, GraphError> {
    let mut count: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(tensor_error(t, format!("negative dimension {d}")));
        }
        count = count
            .checked_mul(d as u64)
            .filter(|c| *c <= MAX_TENSOR_ELEMENTS)
            .ok_or(GraphError::TooLarge {
                what: "a tensor's element count",
                size: u64::MAX,
                limit: MAX_TENSOR_ELEMENTS,
            })?;
    }
    Ok(count as usize)
}

/// Reads a numeric tensor stored in the model (float, double and integer types; `raw_data` little-endian).
fn read_tensor(t: &TensorProto) -> Result<Dense, GraphError> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(GraphError::Unsupported(format!(
            "tensor {:?} is stored as external data, which the exact methods do not read",
            t.name
        )));
    }
    let count = element_count(t)?;
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let raw = &t.raw_data;
    fn from_raw<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        raw.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N")))
            .collect()
    }
    let (size, values): (usize, Vec<f64>) = match t.data_type {
        1 if raw.is_empty() => (4, t.float_data.iter().map(|&v| f64::from(v)).collect()),
        1 => (4, from_raw(raw, |b| f64::from(f32::from_le_bytes(b)))),
        11 if raw.is_empty() => (8, t.double_data.clone()),
        11 => (8, from_raw(raw, f64::from_le_bytes)),
        2 | 3 | 4 | 5 | 6 | 9 if raw.is_empty() => {
            (1, t.int32_data.iter().map(|&v| f64::from(v)).collect())
        }
        2 | 9 => (1, from_raw(raw, |[b]: [u8; 1]| f64::from(b))),
        3 => (1, from_raw(raw, |[b]: [u8; 1]| f64::from(b as i8))),
        4 => (2, from_raw(raw, |b| f64::from(u16::from_le_bytes(b)))),
        5 => (2, from_raw(raw, |b| f64::from(i16::from_le_bytes(b)))),
        6 => (4, from_raw(raw, |b| f64::from(i32::from_le_bytes(b)))),
        7 if raw.is_empty() => (8, t.int64_data.iter().map(|&v| v as f64).collect()),
        7 => (8, from_raw(raw, |b| i64::from_le_bytes(b) as f64)),
        other => {
            return Err(GraphError::Unsupported(format!(
                "tensor {:?} has ONNX data type {other}, which the exact methods do not read",
                t.name
            )))
        }
    };
    if !raw.is_empty() && raw.len() != count * size {
        return Err(tensor_error(
            t,
            format!(
                "{} bytes of raw data for {count} elements of {size} bytes",
                raw.len()
            ),
        ));
    }
    if values.len() != count {
        return Err(tensor_error(
            t,
            format!("{} values for dimensions {:?}", values.len(), t.dims),
        ));
    }
    Ok(Dense { dims, values })
}

/// The constants of a graph: initializers, `Constant` nodes and `DequantizeLinear` of constants.
struct Constants<'g> {
    initializers: HashMap<&'g str, &'g TensorProto>,
    producers: HashMap<&'g str, &'g NodeProto>,
}

impl<'g> Constants<'g> {
    fn new(graph: &'g GraphProto) -> Constants<'g> {
        Constants {
            initializers: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            producers: graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
                .collect(),
        }
    }

    fn is_constant(&self, name: &str, depth: usize) -> bool {
        if name.is_empty() || self.initializers.contains_key(name) {
            return true;
        }
        match self.producers.get(name) {
            Some(n) if n.domain.is_empty() && n.op_type == "Constant" => true,
            Some(n) if n.domain.is_empty() && n.op_type == "DequantizeLinear" => {
                depth < MAX_CONSTANT_DEPTH && n.input.iter().all(|i| self.is_constant(i, depth + 1))
            }
            _ => false,
        }
    }

    /// The value of a constant, `None` when `name` is not one.
    fn value(&self, name: &str, depth: usize) -> Result<Option<Dense>, GraphError> {
        if let Some(t) = self.initializers.get(name) {
            return read_tensor(t).map(Some);
        }
        let Some(node) = self.producers.get(name) else {
            return Ok(None);
        };
        if !node.domain.is_empty() || depth >= MAX_CONSTANT_DEPTH {
            return Ok(None);
        }
        match node.op_type.as_str() {
            "Constant" => {
                if let Some(t) = attribute(node, "value").and_then(|a| a.t.as_ref()) {
                    return read_tensor(t).map(Some);
                }
                if let Some(a) = attribute(node, "value_float") {
                    return Ok(Some(Dense {
                        dims: vec![],
                        values: vec![f64::from(a.f)],
                    }));
                }
                if let Some(a) = attribute(node, "value_floats") {
                    return Ok(Some(Dense {
                        dims: vec![a.floats.len()],
                        values: a.floats.iter().map(|&v| f64::from(v)).collect(),
                    }));
                }
                Ok(None)
            }
            "DequantizeLinear" => {
                let get = |i: usize| -> Result<Option<Dense>, GraphError> {
                    match node.input.get(i).filter(|n| !n.is_empty()) {
                        Some(n) => self.value(n, depth + 1),
                        None => Ok(None),
                    }
                };
                let (Some(x), Some(scale)) = (get(0)?, get(1)?) else {
                    return Ok(None);
                };
                let zero = get(2)?;
                if zero
                    .as_ref()
                    .is_some_and(|z| z.values.len() != scale.values.len())
                {
                    return Err(node_error(node, "zero point and scale differ in size"));
                }
                let axis = attribute(node, "axis").map_or(1, |a| a.i);
                let stride_of = |axis: usize| -> usize { x.dims[axis + 1..].iter().product() };
                let channel: Box<dyn Fn(usize) -> usize> = if scale.values.len() == 1 {
                    Box::new(|_| 0)
                } else {
                    let rank = x.dims.len() as i64;
                    let a = if axis < 0 { axis + rank } else { axis };
                    if a < 0 || a >= rank || x.dims[a as usize] != scale.values.len() {
                        return Err(node_error(
                            node,
                            format!(
                                "{} scales for axis {axis} of dimensions {:?}",
                                scale.values.len(),
                                x.dims
                            ),
                        ));
                    }
                    let (stride, len) = (stride_of(a as usize), x.dims[a as usize]);
                    Box::new(move |i| (i / stride.max(1)) % len)
                };
                let values = x
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let c = channel(i);
                        let z = zero.as_ref().map_or(0.0, |z| z.values[c]);
                        (q - z) * scale.values[c]
                    })
                    .collect();
                Ok(Some(Dense {
                    dims: x.dims.clone(),
                    values,
                }))
            }
            _ => Ok(None),
        }
    }
}

fn attribute<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

// ---------------------------------------------------------------------------------------------------------------
// Linear models

/// Operators allowed after the `Gemm` of a linear model: they read its output but add no dependence on the input.
const HEAD_OPS: &[&str] = &["Softmax", "Sigmoid", "ArgMax", "Gather", "Identity", "Cast"];

fn linear(graph: &GraphProto, input: &str, width: Option<u64>) -> Result<Recognised, GraphError> {
    let other = |reason: String| Ok(Recognised::Other { reason });
    let constants = Constants::new(graph);
    let gemms: Vec<&NodeProto> = graph
        .node
        .iter()
        .filter(|n| n.domain.is_empty() && n.op_type == "Gemm")
        .collect();
    let [gemm] = gemms[..] else {
        return other(format!(
            "the graph has {} Gemm nodes; a linear model has one",
            gemms.len()
        ));
    };
    let consumers = |name: &str| -> Vec<&NodeProto> {
        graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .collect()
    };
    // Imputation: IsNaN(x) -> m; Where(m, fill, x) -> x'.
    let mut current = input.to_string();
    let mut impute_name = None;
    let mut preprocessing: Vec<&NodeProto> = Vec::new();
    let first = consumers(input);
    let is = |n: &NodeProto, op: &str| n.domain.is_empty() && n.op_type == op;
    if let [a, b] = first[..] {
        let (isnan, select) = if is(a, "IsNaN") { (a, b) } else { (b, a) };
        let shaped = is(isnan, "IsNaN")
            && is(select, "Where")
            && isnan.output.len() == 1
            && select.input.len() == 3
            && select.input[0] == isnan.output[0]
            && select.input[2] == input
            && constants.is_constant(&select.input[1], 0)
            && consumers(&isnan.output[0]).len() == 1;
        if !shaped {
            return other("the input goes through more than the Gemm and its imputation".into());
        }
        impute_name = Some(select.input[1].clone());
        current = select.output.first().cloned().unwrap_or_default();
        preprocessing = vec![isnan, select];
    } else if first.len() != 1 {
        return other(format!("the input is read by {} nodes", first.len()));
    }
    let readers = consumers(&current);
    if readers.len() != 1
        || !std::ptr::eq(readers[0], gemm)
        || gemm.input.first() != Some(&current)
        || gemm.input.iter().skip(1).any(|i| i == &current)
    {
        return other("the Gemm does not read the (imputed) input alone".into());
    }
    if attribute(gemm, "transA").is_some_and(|a| a.i != 0) {
        return other("the Gemm transposes its input".into());
    }
    let trans_b = attribute(gemm, "transB").is_some_and(|a| a.i != 0);
    let alpha = attribute(gemm, "alpha").map_or(1.0, |a| f64::from(a.f));
    let beta = attribute(gemm, "beta").map_or(1.0, |a| f64::from(a.f));
    let Some(b_name) = gemm.input.get(1) else {
        return Err(node_error(gemm, "no weight input"));
    };
    let Some(b) = constants.value(b_name, 0).or_else(unsupported_is_none)? else {
        return other("the Gemm's weights are not constants".into());
    };
    let [rows, cols] = b.dims[..] else {
        return Err(node_error(
            gemm,
            format!("weights of dimensions {:?}, not 2-D", b.dims),
        ));
    };
    let (features, outputs) = if trans_b { (cols, rows) } else { (rows, cols) };
    if outputs > MAX_OUTPUTS {
        return Err(GraphError::TooLarge {
            what: "the Gemm's outputs",
            size: outputs as u64,
            limit: MAX_OUTPUTS as u64,
        });
    }
    if features > MAX_FEATURES {
        return Err(GraphError::TooLarge {
            what: "the Gemm's features",
            size: features as u64,
            limit: MAX_FEATURES as u64,
        });
    }
    if let Some(w) = width.filter(|w| *w != features as u64) {
        return Err(node_error(
            gemm,
            format!("weights for {features} features on an input of {w}"),
        ));
    }
    let mut weights = vec![0.0; outputs * features];
    for k in 0..outputs {
        for j in 0..features {
            let v = if trans_b {
                b.values[k * features + j]
            } else {
                b.values[j * outputs + k]
            };
            weights[k * features + j] = alpha * v;
        }
    }
    let bias = match gemm.input.get(2).filter(|c| !c.is_empty()) {
        None => vec![0.0; outputs],
        Some(c_name) => {
            let Some(c) = constants.value(c_name, 0).or_else(unsupported_is_none)? else {
                return other("the Gemm's bias is not a constant".into());
            };
            let broadcast = match (c.dims.as_slice(), c.values.len()) {
                (_, 1) if c.dims.iter().all(|&d| d == 1) => vec![c.values[0]; outputs],
                ([k], _) | ([1, k], _) if *k == outputs => c.values.clone(),
                _ => {
                    return Err(node_error(
                        gemm,
                        format!("bias of dimensions {:?} for {outputs} outputs", c.dims),
                    ))
                }
            };
            broadcast.into_iter().map(|v| beta * v).collect()
        }
    };
    let impute = match impute_name {
        None => None,
        Some(name) => {
            let Some(fill) = constants.value(&name, 0).or_else(unsupported_is_none)? else {
                return other("the imputation values are not readable constants".into());
            };
            Some(match (fill.dims.as_slice(), fill.values.len()) {
                (_, 1) if fill.dims.iter().all(|&d| d == 1) => vec![fill.values[0]; features],
                ([f], _) | ([1, f], _) if *f == features => fill.values,
                _ => {
                    return Err(GraphError::Tensor {
                        name,
                        message: format!(
                            "imputation values of dimensions {:?} for {features} features",
                            fill.dims
                        ),
                    })
                }
            })
        }
    };
    // Everything else must read only constants and what the Gemm produced, through the head operators.
    let Some(margin) = gemm.output.first().cloned() else {
        return Err(node_error(gemm, "no output"));
    };
    let mut downstream: HashSet<&str> = HashSet::from([margin.as_str()]);
    for node in &graph.node {
        if std::ptr::eq(node, gemm) || preprocessing.iter().any(|p| std::ptr::eq(*p, node)) {
            continue;
        }
        let reads_margin = node.input.iter().any(|i| downstream.contains(i.as_str()));
        let reads_only_known = node
            .input
            .iter()
            .all(|i| downstream.contains(i.as_str()) || constants.is_constant(i, 0));
        if !reads_only_known {
            return other(format!(
                "node {:?} ({}) reads values that do not come from the Gemm",
                node.name, node.op_type
            ));
        }
        if !reads_margin {
            continue; // a constant (DequantizeLinear, Constant)
        }
        if !node.domain.is_empty() || !HEAD_OPS.contains(&node.op_type.as_str()) {
            return other(format!(
                "a {} after the Gemm: not a linear model",
                node.op_type
            ));
        }
        if node.op_type == "Softmax" {
            let axis = attribute(node, "axis").map_or(-1, |a| a.i);
            if axis != -1 && axis != 1 {
                return other(format!("a Softmax over axis {axis} after the Gemm"));
            }
        }
        downstream.extend(node.output.iter().map(String::as_str));
    }
    let outputs_named: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // Values equal to `name` through Identity nodes, `name` included.
    let aliases = |name: &str| -> Vec<String> {
        let mut names = vec![name.to_string()];
        let mut i = 0;
        while i < names.len() && names.len() <= graph.node.len() + 1 {
            for n in &graph.node {
                if n.domain.is_empty()
                    && n.op_type == "Identity"
                    && n.input.first() == Some(&names[i])
                {
                    names.extend(n.output.first().cloned());
                }
            }
            i += 1;
        }
        names
    };
    let margin_names = aliases(&margin);
    let visible = |names: &[String]| {
        names
            .iter()
            .find(|n| outputs_named.contains(n.as_str()))
            .cloned()
    };
    let head = |op: &str| -> Option<String> {
        graph
            .node
            .iter()
            .filter(|n| n.domain.is_empty() && n.op_type == op)
            .filter(|n| n.input.first().is_some_and(|i| margin_names.contains(i)))
            .find_map(|n| n.output.first().and_then(|o| visible(&aliases(o))))
    };
    let space = if let Some(output) = visible(&margin_names) {
        LinearSpace::Output { output }
    } else if let Some(probabilities) = head("Softmax") {
        LinearSpace::Softmax {
            logits: margin,
            probabilities,
        }
    } else if let Some(probabilities) = head("Sigmoid") {
        LinearSpace::Sigmoid {
            logits: margin,
            probabilities,
        }
    } else {
        LinearSpace::Margin { margin }
    };
    let binary_pair =
        outputs == 2 && weights[..features].iter().all(|&w| w == 0.0) && bias[0] == 0.0;
    Ok(Recognised::Linear(LinearModel {
        features,
        outputs,
        weights,
        bias,
        trans_b,
        impute,
        space,
        binary_pair,
    }))
}

/// Turns an unsupported constant (external data, a type not read) into "not a constant".
fn unsupported_is_none(e: GraphError) -> Result<Option<Dense>, GraphError> {
    match e {
        GraphError::Unsupported(_) => Ok(None),
        e => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tree ensembles

fn ints<'n>(node: &'n NodeProto, name: &str) -> &'n [i64] {
    attribute(node, name).map_or(&[], |a| a.ints.as_slice())
}

/// A list of reals given as floats `name` or as the double tensor `name_as_tensor`.
fn reals(node: &NodeProto, name: &str) -> Result<Vec<f64>, GraphError> {
    if let Some(a) = attribute(node, name) {
        return Ok(a.floats.iter().map(|&v| f64::from(v)).collect());
    }
    match attribute(node, &format!("{name}_as_tensor")).and_then(|a| a.t.as_ref()) {
        Some(t) => Ok(read_tensor(t)?.values),
        None => Ok(Vec::new()),
    }
}

fn tensor_attribute(node: &NodeProto, name: &str) -> Result<Vec<f64>, GraphError> {
    match attribute(node, name).and_then(|a| a.t.as_ref()) {
        Some(t) => Ok(read_tensor(t)?.values),
        None => Ok(Vec::new()),
    }
}

fn same_length(node: &NodeProto, n: usize, lists: &[(&str, usize)]) -> Result<(), GraphError> {
    for (name, len) in lists {
        if *len != n {
            return Err(node_error(
                node,
                format!("{name} has {len} entries for {n} nodes"),
            ));
        }
    }
    Ok(())
}

fn bounded(what: &'static str, size: i64, limit: usize) -> Result<usize, GraphError> {
    if size < 0 || size as u64 > limit as u64 {
        return Err(GraphError::TooLarge {
            what,
            size: size.max(0) as u64,
            limit: limit as u64,
        });
    }
    Ok(size as usize)
}

/// Where a branch leads, before indices are compacted.
#[derive(Clone, Copy)]
enum Link {
    Node(usize),
    Leaf(usize),
}

/// What a tree builder needs to know about one source node.
struct SourceBranch {
    feature: u32,
    threshold: f64,
    mode: Mode,
    missing_tracks_true: bool,
    yes: Link,
    no: Link,
}

/// Leaf values being collected: (output, weight) pairs.
type LeafValues = Vec<(u32, f64)>;

/// Builds one tree from its root, breadth first, refusing a node reached twice (a cycle or a shared subtree).
/// `branch(i)` describes source node `i` (`None` for a leaf), `leaf(i)` the values of source leaf `i`; `visited`
/// marks source branches across all trees.
fn build_tree(
    root: Link,
    visited: &mut [bool],
    branch: &dyn Fn(usize) -> Result<Option<SourceBranch>, GraphError>,
    leaf: &dyn Fn(usize, &mut LeafValues),
    cycle: &dyn Fn(usize) -> GraphError,
) -> Result<Tree, GraphError> {
    let mut tree = Tree::default();
    let mut order: Vec<Link> = vec![root];
    let mut next = 0;
    while next < order.len() {
        let link = order[next];
        next += 1;
        let node = match link {
            Link::Leaf(i) => {
                let start = tree.leaf_values.len() as u32;
                leaf(i, &mut tree.leaf_values);
                Node::Leaf {
                    start,
                    end: tree.leaf_values.len() as u32,
                }
            }
            Link::Node(i) => {
                if visited[i] {
                    return Err(cycle(i));
                }
                visited[i] = true;
                match branch(i)? {
                    None => {
                        let start = tree.leaf_values.len() as u32;
                        leaf(i, &mut tree.leaf_values);
                        Node::Leaf {
                            start,
                            end: tree.leaf_values.len() as u32,
                        }
                    }
                    Some(b) => {
                        let yes = order.len() as u32;
                        order.push(b.yes);
                        order.push(b.no);
                        Node::Branch {
                            feature: b.feature,
                            threshold: b.threshold,
                            mode: b.mode,
                            missing_tracks_true: b.missing_tracks_true,
                            yes,
                            no: yes + 1,
                        }
                    }
                }
            }
        };
        tree.nodes.push(node);
        if order.len() > u32::MAX as usize / 2 {
            return Err(GraphError::TooLarge {
                what: "a tree's node count",
                size: order.len() as u64,
                limit: u32::MAX as u64 / 2,
            });
        }
    }
    Ok(tree)
}

/// `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (ai.onnx.ml 1 to 3).
fn legacy_ensemble(node: &NodeProto) -> Result<Ensemble, GraphError> {
    let classifier = node.op_type == "TreeEnsembleClassifier";
    let tree_ids = ints(node, "nodes_treeids");
    let node_ids = ints(node, "nodes_nodeids");
    let feature_ids = ints(node, "nodes_featureids");
    let modes: &[Vec<u8>] = attribute(node, "nodes_modes").map_or(&[], |a| a.strings.as_slice());
    let thresholds = reals(node, "nodes_values")?;
    let true_ids = ints(node, "nodes_truenodeids");
    let false_ids = ints(node, "nodes_falsenodeids");
    let missing = ints(node, "nodes_missing_value_tracks_true");
    let n = node_ids.len();
    if n == 0 {
        return Err(node_error(node, "no nodes"));
    }
    same_length(
        node,
        n,
        &[
            ("nodes_treeids", tree_ids.len()),
            ("nodes_featureids", feature_ids.len()),
            ("nodes_modes", modes.len()),
            ("nodes_values", thresholds.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
        ],
    )?;
    if !missing.is_empty() {
        same_length(
            node,
            n,
            &[("nodes_missing_value_tracks_true", missing.len())],
        )?;
    }
    let prefix = if classifier { "class" } else { "target" };
    let w_trees = ints(node, &format!("{prefix}_treeids"));
    let w_nodes = ints(node, &format!("{prefix}_nodeids"));
    let w_ids = ints(node, &format!("{prefix}_ids"));
    let w_values = reals(node, &format!("{prefix}_weights"))?;
    let weights = w_values.len();
    for (name, len) in [
        ("treeids", w_trees.len()),
        ("nodeids", w_nodes.len()),
        ("ids", w_ids.len()),
    ] {
        if len != weights {
            return Err(node_error(
                node,
                format!("{prefix}_{name} has {len} entries for {weights} weights"),
            ));
        }
    }
    let mut base_values = reals(node, "base_values")?;
    let post_transform = match attribute(node, "post_transform") {
        None => PostTransform::None,
        Some(a) => PostTransform::from_name(&a.s).ok_or_else(|| {
            node_error(
                node,
                format!("unknown post_transform {:?}", String::from_utf8_lossy(&a.s)),
            )
        })?,
    };
    let aggregate = match attribute(node, "aggregate_function").map(|a| a.s.as_slice()) {
        None | Some(b"SUM") => Aggregate::Sum,
        Some(b"AVERAGE") if !classifier => Aggregate::Average,
        Some(b"MIN" | b"MAX") if !classifier => {
            return Err(GraphError::Unsupported(
                "trees aggregated by MIN or MAX have no additive attributions".into(),
            ))
        }
        Some(other) => {
            return Err(node_error(
                node,
                format!(
                    "unknown aggregate_function {:?}",
                    String::from_utf8_lossy(other)
                ),
            ))
        }
    };
    let (outputs, kind) = if classifier {
        let labels: Vec<String> = match (
            attribute(node, "classlabels_int64s").filter(|a| !a.ints.is_empty()),
            attribute(node, "classlabels_strings").filter(|a| !a.strings.is_empty()),
        ) {
            (Some(a), None) => a.ints.iter().map(|i| i.to_string()).collect(),
            (None, Some(a)) => a
                .strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
            _ => {
                return Err(node_error(
                    node,
                    "needs exactly one of classlabels_int64s and classlabels_strings",
                ))
            }
        };
        let classes = bounded("the class count", labels.len() as i64, MAX_OUTPUTS)?;
        if let Some(&bad) = w_ids.iter().find(|&&c| c < 0 || c as usize >= classes) {
            return Err(node_error(
                node,
                format!("class id {bad} of {classes} classes"),
            ));
        }
        let scored: HashSet<i64> = w_ids.iter().copied().collect();
        if classes == 2 && base_values.len() == 2 && scored.contains(&1) {
            return Err(GraphError::Unsupported(
                "a binary tree classifier with two base values and class-1 weights, whose output ONNX Runtime \
                 derives from class 0's score alone"
                    .into(),
            ));
        }
        let single =
            classes == 2 && scored.len() == 1 && scored.contains(&0) && base_values.len() <= 1;
        let outputs = if single { 1 } else { classes };
        if base_values.len() > outputs {
            return Err(node_error(
                node,
                format!("{} base values for {outputs} margins", base_values.len()),
            ));
        }
        (
            outputs,
            EnsembleKind::Classifier {
                labels,
                binary_single_column: single,
            },
        )
    } else {
        let targets = bounded(
            "n_targets",
            attribute(node, "n_targets").map_or(1, |a| a.i),
            MAX_OUTPUTS,
        )?;
        if targets == 0 {
            return Err(node_error(node, "n_targets is 0"));
        }
        if let Some(&bad) = w_ids.iter().find(|&&t| t < 0 || t as usize >= targets) {
            return Err(node_error(
                node,
                format!("target id {bad} of {targets} targets"),
            ));
        }
        if !base_values.is_empty() && base_values.len() != targets {
            return Err(node_error(
                node,
                format!("{} base values for {targets} targets", base_values.len()),
            ));
        }
        (targets, EnsembleKind::Regressor)
    };
    base_values.resize(outputs, 0.0);

    // (tree id, node id) -> position; trees in order of first appearance, rooted at their first node.
    let mut position: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
    let mut roots: Vec<usize> = Vec::new();
    let mut seen_trees: HashSet<i64> = HashSet::new();
    for i in 0..n {
        if position.insert((tree_ids[i], node_ids[i]), i).is_some() {
            return Err(node_error(
                node,
                format!("node {} of tree {} appears twice", node_ids[i], tree_ids[i]),
            ));
        }
        // ONNX Runtime starts a tree wherever the tree id changes: a tree's nodes must be contiguous.
        if i == 0 || tree_ids[i] != tree_ids[i - 1] {
            if !seen_trees.insert(tree_ids[i]) {
                return Err(node_error(
                    node,
                    format!("the nodes of tree {} are not contiguous", tree_ids[i]),
                ));
            }
            roots.push(i);
        }
    }
    let mut parsed_modes: Vec<Option<Mode>> = Vec::with_capacity(n);
    let mut features = 0usize;
    for i in 0..n {
        let mode = Mode::from_name(&modes[i]).ok_or_else(|| {
            node_error(
                node,
                format!("unknown node mode {:?}", String::from_utf8_lossy(&modes[i])),
            )
        })?;
        if mode.is_some() {
            let f = bounded("a feature id", feature_ids[i], MAX_FEATURES - 1)?;
            features = features.max(f + 1);
        }
        parsed_modes.push(mode);
    }
    // Leaf weights grouped by node position (compressed rows).
    let mut starts = vec![0u32; n + 1];
    let mut owner = Vec::with_capacity(weights);
    for e in 0..weights {
        let Some(&p) = position.get(&(w_trees[e], w_nodes[e])) else {
            return Err(node_error(
                node,
                format!(
                    "a weight for node {} of tree {}, which does not exist",
                    w_nodes[e], w_trees[e]
                ),
            ));
        };
        if parsed_modes[p].is_some() {
            return Err(node_error(
                node,
                format!(
                    "a weight for node {} of tree {}, which is not a leaf",
                    w_nodes[e], w_trees[e]
                ),
            ));
        }
        starts[p + 1] += 1;
        owner.push(p);
    }
    for i in 0..n {
        starts[i + 1] += starts[i];
    }
    let mut fill = starts.clone();
    let mut grouped = vec![(0u32, 0.0f64); weights];
    for e in 0..weights {
        let slot = &mut fill[owner[e]];
        grouped[*slot as usize] = (w_ids[e] as u32, w_values[e]);
        *slot += 1;
    }
    let child = |i: usize, id: i64, side: &str| -> Result<Link, GraphError> {
        position
            .get(&(tree_ids[i], id))
            .map(|&p| Link::Node(p))
            .ok_or_else(|| {
                node_error(
                    node,
                    format!(
                        "node {} of tree {} has {side} child {id}, which does not exist",
                        node_ids[i], tree_ids[i]
                    ),
                )
            })
    };
    let branch = |i: usize| -> Result<Option<SourceBranch>, GraphError> {
        let Some(mode) = parsed_modes[i] else {
            return Ok(None);
        };
        Ok(Some(SourceBranch {
            feature: feature_ids[i] as u32,
            threshold: thresholds[i],
            mode,
            missing_tracks_true: missing.get(i).is_some_and(|&m| m != 0),
            yes: child(i, true_ids[i], "true")?,
            no: child(i, false_ids[i], "false")?,
        }))
    };
    let leaf = |i: usize, out: &mut LeafValues| {
        out.extend_from_slice(&grouped[starts[i] as usize..starts[i + 1] as usize]);
    };
    let cycle = |i: usize| {
        node_error(
            node,
            format!(
                "node {} of tree {} is reached twice (a cycle or a shared subtree)",
                node_ids[i], tree_ids[i]
            ),
        )
    };
    let mut visited = vec![false; n];
    let trees = roots
        .iter()
        .map(|&r| build_tree(Link::Node(r), &mut visited, &branch, &leaf, &cycle))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ensemble {
        op: node.op_type.clone(),
        features,
        outputs,
        trees,
        base_values,
        aggregate,
        post_transform,
        kind,
    })
}

/// `TreeEnsemble` (ai.onnx.ml 5): interior nodes and leaves in separate lists, modes and thresholds as tensors.
fn opset5_ensemble(node: &NodeProto) -> Result<Ensemble, GraphError> {
    let feature_ids = ints(node, "nodes_featureids");
    let thresholds = tensor_attribute(node, "nodes_splits")?;
    let modes = tensor_attribute(node, "nodes_modes")?;
    let true_ids = ints(node, "nodes_truenodeids");
    let false_ids = ints(node, "nodes_falsenodeids");
    let true_leafs = ints(node, "nodes_trueleafs");
    let false_leafs = ints(node, "nodes_falseleafs");
    let missing = ints(node, "nodes_missing_value_tracks_true");
    let roots = ints(node, "tree_roots");
    let leaf_targets = ints(node, "leaf_targetids");
    let leaf_weights = tensor_attribute(node, "leaf_weights")?;
    let n = feature_ids.len();
    if n == 0 || roots.is_empty() {
        return Err(node_error(node, "no nodes or no tree roots"));
    }
    same_length(
        node,
        n,
        &[
            ("nodes_splits", thresholds.len()),
            ("nodes_modes", modes.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_trueleafs", true_leafs.len()),
            ("nodes_falseleafs", false_leafs.len()),
        ],
    )?;
    if !missing.is_empty() {
        same_length(
            node,
            n,
            &[("nodes_missing_value_tracks_true", missing.len())],
        )?;
    }
    let leaves = leaf_weights.len();
    if leaf_targets.len() != leaves {
        return Err(node_error(
            node,
            format!(
                "leaf_targetids has {} entries for {leaves} leaf weights",
                leaf_targets.len()
            ),
        ));
    }
    let outputs = bounded(
        "n_targets",
        attribute(node, "n_targets").map_or(1, |a| a.i),
        MAX_OUTPUTS,
    )?;
    if outputs == 0 {
        return Err(node_error(node, "n_targets is 0"));
    }
    if let Some(&bad) = leaf_targets
        .iter()
        .find(|&&t| t < 0 || t as usize >= outputs)
    {
        return Err(node_error(
            node,
            format!("target id {bad} of {outputs} targets"),
        ));
    }
    let aggregate = match attribute(node, "aggregate_function").map_or(1, |a| a.i) {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 | 3 => {
            return Err(GraphError::Unsupported(
                "trees aggregated by MIN or MAX have no additive attributions".into(),
            ))
        }
        other => {
            return Err(node_error(
                node,
                format!("unknown aggregate_function {other}"),
            ))
        }
    };
    let post_transform = match attribute(node, "post_transform").map_or(0, |a| a.i) {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        other => return Err(node_error(node, format!("unknown post_transform {other}"))),
    };
    let mut parsed_modes = Vec::with_capacity(n);
    let mut features = 0usize;
    for i in 0..n {
        if modes[i] == 6.0 {
            return Err(GraphError::Unsupported(
                "BRANCH_MEMBER splits are not read by the exact tree method".into(),
            ));
        }
        let mode = Mode::from_code(modes[i])
            .ok_or_else(|| node_error(node, format!("unknown node mode {}", modes[i])))?;
        let f = bounded("a feature id", feature_ids[i], MAX_FEATURES - 1)?;
        features = features.max(f + 1);
        parsed_modes.push(mode);
    }
    let link = |is_leaf: i64, id: i64, side: &str, i: usize| -> Result<Link, GraphError> {
        let (limit, make): (usize, fn(usize) -> Link) = if is_leaf != 0 {
            (leaves, Link::Leaf)
        } else {
            (n, Link::Node)
        };
        if id < 0 || id as u64 >= limit as u64 {
            return Err(node_error(
                node,
                format!("node {i} has {side} child {id}, out of range"),
            ));
        }
        Ok(make(id as usize))
    };
    let branch = |i: usize| -> Result<Option<SourceBranch>, GraphError> {
        Ok(Some(SourceBranch {
            feature: feature_ids[i] as u32,
            threshold: thresholds[i],
            mode: parsed_modes[i],
            missing_tracks_true: missing.get(i).is_some_and(|&m| m != 0),
            yes: link(true_leafs[i], true_ids[i], "true", i)?,
            no: link(false_leafs[i], false_ids[i], "false", i)?,
        }))
    };
    let leaf = |i: usize, out: &mut LeafValues| {
        out.push((leaf_targets[i] as u32, leaf_weights[i]));
    };
    let cycle = |i: usize| {
        node_error(
            node,
            format!("node {i} is reached twice (a cycle or a shared subtree)"),
        )
    };
    let mut visited = vec![false; n];
    let mut trees = Vec::with_capacity(roots.len().min(n));
    for &r in roots {
        if r < 0 || r as u64 >= n as u64 {
            return Err(node_error(node, format!("tree root {r} out of range")));
        }
        trees.push(build_tree(
            Link::Node(r as usize),
            &mut visited,
            &branch,
            &leaf,
            &cycle,
        )?);
    }
    Ok(Ensemble {
        op: node.op_type.clone(),
        features,
        outputs,
        trees,
        base_values: vec![0.0; outputs],
        aggregate,
        post_transform,
        kind: EnsembleKind::Regressor,
    })
}
