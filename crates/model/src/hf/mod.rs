//! Hugging Face checkpoints to standard ONNX, without Python: a folder as the hub ships it (`config.json` and
//! `model.safetensors`, or shards named by `model.safetensors.index.json`) of the BERT family (BERT, MiniLM,
//! RoBERTa, XLM-RoBERTa) becomes an opset-17 graph with the weights inline.
//!
//! The graph takes `input_ids`, `attention_mask` and (for BERT, and for RoBERTa models whose token type table has
//! more than one row) `token_type_ids`, all INT64 `[batch_size, sequence_length]`, and gives:
//! - for a base model (`BertModel`, sentence-transformers, and the encoder of `*ForMaskedLM` /
//!   `*ForPreTraining` checkpoints): `last_hidden_state`, FP32 `[batch_size, sequence_length, hidden]`
//!   (pooling and normalization are left to the server);
//! - for `*ForSequenceClassification` (cross-encoders with one label included): `logits`, FP32
//!   `[batch_size, num_labels]`, through BERT's pooler (dense + tanh on `[CLS]`) and classifier, or RoBERTa's
//!   classification head (dense + tanh + out_proj on `<s>`).
//!
//! It follows `transformers`' modules: embeddings (word + position + token type, LayerNorm), then per layer
//! self-attention with the additive mask `(1 - mask) * f32::MIN` broadcast over heads, softmax, output dense +
//! residual + LayerNorm, feed-forward with the configured activation (`gelu` through `Erf`, exactly) + residual +
//! LayerNorm. BERT's positions are `0..sequence_length` (the position table sliced by a 1-D end taken from
//! `Shape(input_ids)`, a form ONNX Runtime's optimizer handles); RoBERTa's count non-padding tokens from
//! `pad_token_id + 1`, as `transformers` computes them, so left padding gives the same answers too.
//!
//! Weights are written inline, so the model must stay under protobuf's 2 GiB: larger ones are refused
//! ([`HfError::TooLarge`]).

mod config;
pub mod safetensors;

use std::path::{Path, PathBuf};

use prost::Message;

pub use config::{Activation, Config, Family, Head};
use safetensors::{SafeTensors, SafetensorsError};

use crate::onnx::{AttributeProto, GraphBuilder, ModelProto, TensorProto};
use crate::DataType;

/// The largest FP32 weight total [`import`] writes inline (about 1.9 GiB, under protobuf's 2 GiB limit).
pub const MAX_INLINE_WEIGHT_BYTES: u64 = 19 * (1 << 30) / 10;

/// The files besides the weights that make a Hugging Face folder a servable text model (tokenizer, its settings,
/// sentence-transformers' pooling and normalization), relative to the folder; `ferry import hf` copies those
/// present.
pub const COMPANION_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// Why a folder cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or lacks a setting.
    #[error("config.json: {0}")]
    Config(String),
    /// The model is not one the importer builds.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The folder holds no safetensors weights.
    #[error("the folder has no model.safetensors (nor model.safetensors.index.json){found}; Ferry reads safetensors weights only")]
    NoWeights {
        /// The folder.
        dir: PathBuf,
        /// What weights it holds instead, worded for the message (` but pytorch_model.bin`), or empty.
        found: String,
    },
    /// A safetensors file (or a shard index) is malformed.
    #[error("{file}: {why}")]
    Weights {
        /// The file name.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// A weight the architecture needs is absent.
    #[error("the weights have no `{name}`, which {what} needs (is this checkpoint a {model_type} model?)")]
    MissingWeight {
        /// The tensor name looked for.
        name: String,
        /// The part of the model that needs it.
        what: String,
        /// `model_type` from config.json.
        model_type: &'static str,
    },
    /// A weight's shape is not what `config.json` implies.
    #[error("weight `{name}` has shape {found:?}, but config.json implies {expected:?}")]
    WrongShape {
        /// The tensor.
        name: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// The weights are too large to write inside one ONNX file.
    #[error("the model's weights take {bytes} bytes as FP32, more than the {limit} bytes one ONNX file can hold inline (protobuf's 2 GiB limit); models this large need ONNX external data, which `ferry import hf` does not write yet")]
    TooLarge {
        /// The FP32 bytes of the weights.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
}

/// What the graph computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// `last_hidden_state`, to pool into sentence embeddings.
    Embedding,
    /// `logits` over `id2label`.
    Classifier,
}

/// An imported model: the ONNX file's bytes and what a server needs to know about it.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The serialized `model.onnx`.
    pub onnx: Vec<u8>,
    /// What the graph computes.
    pub kind: ModelKind,
    /// The architecture.
    pub family: Family,
    /// The width of `last_hidden_state`.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Classes (the width of `logits`); 0 for an embedding model.
    pub num_labels: usize,
    /// Class labels in index order (from `id2label`, `LABEL_i` where it names none); empty for an embedding model.
    pub id2label: Vec<String>,
    /// `max_position_embeddings` from config.json.
    pub max_position_embeddings: usize,
    /// The longest sequence the position table allows (RoBERTa's start at `pad_token_id + 1`).
    pub max_sequence_length: usize,
    /// The graph's inputs in order (`input_ids`, `attention_mask`, and `token_type_ids` where the model takes it).
    pub inputs: Vec<String>,
    /// The graph's output (`last_hidden_state` or `logits`).
    pub output: String,
    /// The FP32 bytes of the weights written.
    pub weight_bytes: u64,
}

/// Whether `files` (names relative to a folder) hold a Hugging Face checkpoint Ferry can import: `config.json` and
/// `model.safetensors` or its shard index.
pub fn is_checkpoint(mut files: impl FnMut(&str) -> bool) -> bool {
    files("config.json") && (files("model.safetensors") || files("model.safetensors.index.json"))
}

/// Imports the Hugging Face folder `dir` (see the [module documentation](self)).
pub fn import(dir: &Path) -> Result<Imported, HfError> {
    import_with_limit(dir, MAX_INLINE_WEIGHT_BYTES)
}

/// [`import`], refusing weights over `max_weight_bytes` (as FP32) before any is read.
pub fn import_with_limit(dir: &Path, max_weight_bytes: u64) -> Result<Imported, HfError> {
    let config_path = dir.join("config.json");
    let text = read_config(&config_path).map_err(|source| HfError::Io {
        path: config_path,
        source,
    })?;
    let config = Config::parse(&text)?;
    let bytes = config.weight_bytes();
    if bytes > max_weight_bytes {
        return Err(HfError::TooLarge {
            bytes,
            limit: max_weight_bytes,
        });
    }
    let weights = Weights::open(dir, max_weight_bytes.saturating_mul(2))?;
    let model = build(&config, &weights)?;
    // The files' bytes go before the model is serialized: the peak is then twice the weights, not three times.
    drop(weights);
    let (kind, output) = match config.head {
        Head::Base => (ModelKind::Embedding, "last_hidden_state"),
        Head::SequenceClassification => (ModelKind::Classifier, "logits"),
    };
    Ok(Imported {
        inputs: model
            .graph
            .as_ref()
            .map(|g| g.input.iter().map(|i| i.name.clone()).collect())
            .unwrap_or_default(),
        onnx: model.encode_to_vec(),
        kind,
        family: config.family,
        hidden_size: config.hidden_size,
        num_layers: config.num_layers,
        num_labels: config.labels.len(),
        id2label: config.labels.clone(),
        max_position_embeddings: config.max_position_embeddings,
        max_sequence_length: config.max_sequence_length(),
        output: output.into(),
        weight_bytes: bytes,
    })
}

/// `config.json`'s text, refused past 16 MiB before it is read (a huge or sparse file must not be read whole).
fn read_config(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    const LIMIT: u64 = 16 << 20;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(LIMIT + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > LIMIT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is larger than the {LIMIT} bytes allowed"),
        ));
    }
    Ok(text)
}

/// The weights of a folder: `model.safetensors`, or the shards `model.safetensors.index.json` names.
struct Weights {
    files: Vec<(String, SafeTensors)>,
}

impl Weights {
    /// Reads the weights' files, refusing them once their sizes add up to more than `max_file_bytes` (before any is
    /// read: the files are read whole, so a huge or sparse file dropped beside a small `config.json` would otherwise
    /// be copied into memory whatever its header says).
    fn open(dir: &Path, max_file_bytes: u64) -> Result<Weights, HfError> {
        let total = std::cell::Cell::new(0u64);
        let read = |name: &str| -> Result<Vec<u8>, HfError> {
            use std::io::Read as _;
            let path = dir.join(name);
            let io = |source| HfError::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            let left = max_file_bytes.saturating_sub(total.get());
            if len > left {
                return Err(HfError::Weights {
                    file: name.into(),
                    why: format!(
                        "the weights' files take {} bytes or more, more than the {max_file_bytes} bytes allowed \
                         (twice the FP32 weights' limit)",
                        total.get().saturating_add(len)
                    ),
                });
            }
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            // A file that grows while it is read is cut at the limit (and then fails to parse).
            file.take(left).read_to_end(&mut bytes).map_err(io)?;
            total.set(total.get().saturating_add(bytes.len() as u64));
            Ok(bytes)
        };
        let parse = |name: &str| -> Result<(String, SafeTensors), HfError> {
            let st = SafeTensors::parse(read(name)?).map_err(|e| HfError::Weights {
                file: name.into(),
                why: e.to_string(),
            })?;
            Ok((name.to_string(), st))
        };
        if dir.join("model.safetensors").is_file() {
            return Ok(Weights {
                files: vec![parse("model.safetensors")?],
            });
        }
        let index = "model.safetensors.index.json";
        if dir.join(index).is_file() {
            let bad = |why: String| HfError::Weights {
                file: index.into(),
                why,
            };
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let index: Index =
                serde_json::from_slice(&read(index)?).map_err(|e| bad(e.to_string()))?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            let mut files = Vec::new();
            for name in names {
                // Shards are files of the folder itself.
                if name.is_empty()
                    || name.contains(['/', '\\'])
                    || name == ".."
                    || !name.ends_with(".safetensors")
                {
                    return Err(bad(format!(
                        "shard `{name}` is not a .safetensors file of the folder"
                    )));
                }
                files.push(parse(name)?);
            }
            return Ok(Weights { files });
        }
        let found = [
            "pytorch_model.bin",
            "tf_model.h5",
            "model.onnx",
            "onnx/model.onnx",
        ]
        .into_iter()
        .filter(|f| dir.join(f).is_file())
        .collect::<Vec<_>>();
        Err(HfError::NoWeights {
            dir: dir.to_path_buf(),
            found: if found.is_empty() {
                String::new()
            } else {
                format!(" but {}", found.join(", "))
            },
        })
    }

    /// The file (its name and contents) that holds `name`.
    fn find(&self, name: &str) -> Option<&(String, SafeTensors)> {
        self.files.iter().find(|(_, st)| st.info(name).is_some())
    }

    fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// A tensor as `f32`, checked against the shape config.json implies.
    fn get(&self, name: &str, shape: &[usize], need: &Need) -> Result<Vec<f32>, HfError> {
        let (file, st) = self.find(name).ok_or_else(|| HfError::MissingWeight {
            name: name.into(),
            what: need.what.clone(),
            model_type: need.model_type,
        })?;
        let info = st.info(name).expect("found");
        if info.shape != shape {
            return Err(HfError::WrongShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        st.f32(name)
            .map_err(|e: SafetensorsError| HfError::Weights {
                file: file.clone(),
                why: e.to_string(),
            })
    }
}

/// What a weight is for, for the error when it is missing.
struct Need {
    what: String,
    model_type: &'static str,
}

/// Builds the graph node by node, naming intermediate values uniquely.
struct Builder<'w> {
    g: GraphBuilder,
    weights: &'w Weights,
    /// The prefix of the encoder's weights in this checkpoint (`bert.`, `roberta.` or none).
    prefix: String,
    model_type: &'static str,
    next: usize,
}

impl Builder<'_> {
    fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) {
        self.g = std::mem::take(&mut self.g).node(op, inputs, outputs, attrs);
    }

    /// A node with one output, named after the operator; returns the output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.next += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.next);
        self.node(op, inputs, &[&out], attrs);
        out
    }

    fn initializer(&mut self, tensor: TensorProto) {
        self.g = std::mem::take(&mut self.g).initializer(tensor);
    }

    fn constant_f32(&mut self, name: &str, value: f32) -> String {
        self.initializer(TensorProto::f32(name, &[], vec![value]));
        name.into()
    }

    fn constant_i64(&mut self, name: &str, dims: &[i64], values: Vec<i64>) -> String {
        self.initializer(TensorProto::i64(name, dims, values));
        name.into()
    }

    fn weight_initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializer(TensorProto::raw(name, DataType::F32, &dims, raw));
        name.into()
    }

    /// An encoder weight's name in this checkpoint.
    fn encoder(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A weight read and added as an initializer of the same name.
    fn weight(&mut self, name: &str, shape: &[usize], what: &str) -> Result<String, HfError> {
        let need = Need {
            what: what.into(),
            model_type: self.model_type,
        };
        let values = self.weights.get(name, shape, &need)?;
        Ok(self.weight_initializer(name, shape, &values))
    }

    /// `x @ W^T + b` for `torch.nn.Linear` weights `{name}.weight` `[out, inp]` and `{name}.bias` `[out]`.
    fn linear(&mut self, x: &str, name: &str, inp: usize, out: usize) -> Result<String, HfError> {
        let need = Need {
            what: format!("the {name} layer"),
            model_type: self.model_type,
        };
        let w = self
            .weights
            .get(&format!("{name}.weight"), &[out, inp], &need)?;
        let mut t = vec![0f32; w.len()];
        for o in 0..out {
            for i in 0..inp {
                t[i * out + o] = w[o * inp + i];
            }
        }
        let w = self.weight_initializer(&format!("{name}.weight"), &[inp, out], &t);
        let b = self.weight(&format!("{name}.bias"), &[out], &need.what)?;
        let y = self.op("MatMul", &[x, &w], vec![]);
        Ok(self.op("Add", &[&y, &b], vec![]))
    }

    /// `LayerNormalization` over the last axis with `{name}.weight`/`.bias` (or the older `.gamma`/`.beta`).
    fn layer_norm(
        &mut self,
        x: &str,
        name: &str,
        width: usize,
        eps: f32,
    ) -> Result<String, HfError> {
        let what = format!("the {name} layer");
        let (scale, bias) = if self.weights.contains(&format!("{name}.gamma"))
            && !self.weights.contains(&format!("{name}.weight"))
        {
            (format!("{name}.gamma"), format!("{name}.beta"))
        } else {
            (format!("{name}.weight"), format!("{name}.bias"))
        };
        let scale = self.weight(&scale, &[width], &what)?;
        let bias = self.weight(&bias, &[width], &what)?;
        Ok(self.op(
            "LayerNormalization",
            &[x, &scale, &bias],
            vec![
                AttributeProto::int("axis", -1),
                AttributeProto::float("epsilon", eps),
            ],
        ))
    }
}

/// The ONNX model of `config` with `weights`.
fn build(config: &Config, weights: &Weights) -> Result<ModelProto, HfError> {
    let family = config.family;
    let model_type = family.model_type();
    let word = "embeddings.word_embeddings.weight";
    let prefix = if weights.contains(&format!("{}{word}", family.prefix())) {
        family.prefix()
    } else if weights.contains(word) {
        ""
    } else {
        return Err(HfError::MissingWeight {
            name: word.into(),
            what: format!(
                "the embeddings (looked for it with and without the `{}` prefix)",
                family.prefix()
            ),
            model_type,
        });
    };
    let (h, heads) = (config.hidden_size, config.num_heads);
    let token_types = !family.is_roberta() || config.type_vocab_size > 1;
    let i64_input = |g: GraphBuilder, name: &str| g.input(name, DataType::I64, Some(&[-1, -1]));
    let mut g = i64_input(GraphBuilder::new("hf_import"), "input_ids");
    g = i64_input(g, "attention_mask");
    if token_types {
        g = i64_input(g, "token_type_ids");
    }
    g = match config.head {
        Head::Base => g.output(
            "last_hidden_state",
            DataType::F32,
            Some(&[-1, -1, h as i64]),
        ),
        Head::SequenceClassification => g.output(
            "logits",
            DataType::F32,
            Some(&[-1, config.labels.len() as i64]),
        ),
    };
    g = g
        .metadata("ferry.import", "hf")
        .metadata("model_type", model_type);
    if config.head == Head::SequenceClassification {
        g = g.metadata(
            "id2label",
            &serde_json::to_string(&config.labels).expect("strings serialize"),
        );
    }
    let mut b = Builder {
        g,
        weights,
        prefix: prefix.into(),
        model_type,
        next: 0,
    };
    let eps = config.layer_norm_eps;

    // Embeddings.
    let name = b.encoder(word);
    let table = b.weight(&name, &[config.vocab_size, h], "the word embeddings")?;
    let words = b.op("Gather", &[&table, "input_ids"], vec![]);
    let name = b.encoder("embeddings.position_embeddings.weight");
    let positions_table = b.weight(
        &name,
        &[config.max_position_embeddings, h],
        "the position embeddings",
    )?;
    let positions = if family.is_roberta() {
        // transformers' create_position_ids_from_input_ids: cumsum(ids != pad) * (ids != pad) + pad.
        let pad = b.constant_i64("pad_token_id", &[], vec![config.pad_token_id]);
        let is_pad = b.op("Equal", &["input_ids", &pad], vec![]);
        let not_pad = b.op("Not", &[&is_pad], vec![]);
        let mask = b.op(
            "Cast",
            &[&not_pad],
            vec![AttributeProto::int("to", DataType::I64.onnx_code() as i64)],
        );
        let axis = b.constant_i64("axis_1", &[], vec![1]);
        let count = b.op("CumSum", &[&mask, &axis], vec![]);
        let count = b.op("Mul", &[&count, &mask], vec![]);
        let ids = b.op("Add", &[&count, &pad], vec![]);
        b.op("Gather", &[&positions_table, &ids], vec![])
    } else {
        // Rows 0..sequence_length, the end a 1-D slice of the shape (a scalar Gather there trips ONNX Runtime's
        // optimizer).
        let shape = b.op("Shape", &["input_ids"], vec![]);
        let one = b.constant_i64("one_1d", &[1], vec![1]);
        let two = b.constant_i64("two_1d", &[1], vec![2]);
        let zero = b.constant_i64("zero_1d", &[1], vec![0]);
        let length = b.op("Slice", &[&shape, &one, &two], vec![]);
        b.op("Slice", &[&positions_table, &zero, &length, &zero], vec![])
    };
    let mut x = b.op("Add", &[&words, &positions], vec![]);
    let name = b.encoder("embeddings.token_type_embeddings.weight");
    let types_shape = [config.type_vocab_size, h];
    if token_types {
        let table = b.weight(&name, &types_shape, "the token type embeddings")?;
        let types = b.op("Gather", &[&table, "token_type_ids"], vec![]);
        x = b.op("Add", &[&x, &types], vec![]);
    } else {
        // One token type: its row is added to every token.
        let need = Need {
            what: "the token type embeddings".into(),
            model_type,
        };
        let table = weights.get(&name, &types_shape, &need)?;
        let row = b.weight_initializer(&name, &[h], &table[..h]);
        x = b.op("Add", &[&x, &row], vec![]);
    }
    let name = b.encoder("embeddings.LayerNorm");
    x = b.layer_norm(&x, &name, h, eps)?;

    // The additive attention mask, [batch, 1, 1, sequence].
    let mask = b.op(
        "Cast",
        &["attention_mask"],
        vec![AttributeProto::int("to", DataType::F32.onnx_code() as i64)],
    );
    let axes = b.constant_i64("axes_1_2", &[2], vec![1, 2]);
    let mask = b.op("Unsqueeze", &[&mask, &axes], vec![]);
    let one = b.constant_f32("one", 1.0);
    let inverted = b.op("Sub", &[&one, &mask], vec![]);
    let lowest = b.constant_f32("lowest", f32::MIN);
    let mask = b.op("Mul", &[&inverted, &lowest], vec![]);

    let head_dim = h / heads;
    let split = b.constant_i64(
        "shape_heads",
        &[4],
        vec![0, 0, heads as i64, head_dim as i64],
    );
    let merge = b.constant_i64("shape_hidden", &[3], vec![0, 0, h as i64]);
    let scale = b.constant_f32("sqrt_head_dim", (head_dim as f32).sqrt());
    let perm = |p: [i64; 4]| vec![AttributeProto::ints("perm", p.to_vec())];
    let inter = config.intermediate_size;
    // The activation's constants, once for every layer.
    let gelu = config.activation != Activation::Relu;
    let half = if gelu {
        b.constant_f32("half", 0.5)
    } else {
        String::new()
    };
    let (sqrt2, gelu_c, sqrt_2_over_pi) = match config.activation {
        Activation::Gelu => (
            b.constant_f32("sqrt_2", std::f32::consts::SQRT_2),
            String::new(),
            String::new(),
        ),
        Activation::GeluTanh => (
            String::new(),
            b.constant_f32("gelu_c", 0.044715),
            b.constant_f32("sqrt_2_over_pi", (2.0 / std::f64::consts::PI).sqrt() as f32),
        ),
        Activation::Relu => Default::default(),
    };
    for layer in 0..config.num_layers {
        let base = b.encoder(&format!("encoder.layer.{layer}"));
        let q = b.linear(&x, &format!("{base}.attention.self.query"), h, h)?;
        let k = b.linear(&x, &format!("{base}.attention.self.key"), h, h)?;
        let v = b.linear(&x, &format!("{base}.attention.self.value"), h, h)?;
        let q = b.op("Reshape", &[&q, &split], vec![]);
        let q = b.op("Transpose", &[&q], perm([0, 2, 1, 3]));
        let k = b.op("Reshape", &[&k, &split], vec![]);
        let k = b.op("Transpose", &[&k], perm([0, 2, 3, 1]));
        let v = b.op("Reshape", &[&v, &split], vec![]);
        let v = b.op("Transpose", &[&v], perm([0, 2, 1, 3]));
        let scores = b.op("MatMul", &[&q, &k], vec![]);
        let scores = b.op("Div", &[&scores, &scale], vec![]);
        let scores = b.op("Add", &[&scores, &mask], vec![]);
        let probs = b.op("Softmax", &[&scores], vec![AttributeProto::int("axis", -1)]);
        let context = b.op("MatMul", &[&probs, &v], vec![]);
        let context = b.op("Transpose", &[&context], perm([0, 2, 1, 3]));
        let context = b.op("Reshape", &[&context, &merge], vec![]);
        let out = b.linear(&context, &format!("{base}.attention.output.dense"), h, h)?;
        let out = b.op("Add", &[&out, &x], vec![]);
        let attended = b.layer_norm(&out, &format!("{base}.attention.output.LayerNorm"), h, eps)?;
        let y = b.linear(&attended, &format!("{base}.intermediate.dense"), h, inter)?;
        let y = match config.activation {
            Activation::Gelu => {
                let scaled = b.op("Div", &[&y, &sqrt2], vec![]);
                let erf = b.op("Erf", &[&scaled], vec![]);
                let erf = b.op("Add", &[&erf, &one], vec![]);
                let y = b.op("Mul", &[&y, &erf], vec![]);
                b.op("Mul", &[&y, &half], vec![])
            }
            Activation::GeluTanh => {
                let (c, s) = (&gelu_c, &sqrt_2_over_pi);
                let cube = b.op("Mul", &[&y, &y], vec![]);
                let cube = b.op("Mul", &[&cube, &y], vec![]);
                let inner = b.op("Mul", &[&cube, c], vec![]);
                let inner = b.op("Add", &[&y, &inner], vec![]);
                let inner = b.op("Mul", &[&inner, s], vec![]);
                let t = b.op("Tanh", &[&inner], vec![]);
                let t = b.op("Add", &[&t, &one], vec![]);
                let y = b.op("Mul", &[&y, &half], vec![]);
                b.op("Mul", &[&y, &t], vec![])
            }
            Activation::Relu => b.op("Relu", &[&y], vec![]),
        };
        let y = b.linear(&y, &format!("{base}.output.dense"), inter, h)?;
        let y = b.op("Add", &[&y, &attended], vec![]);
        x = b.layer_norm(&y, &format!("{base}.output.LayerNorm"), h, eps)?;
    }

    match config.head {
        Head::Base => b.node("Identity", &[&x], &["last_hidden_state"], vec![]),
        Head::SequenceClassification => {
            let n = config.labels.len();
            let first = b.constant_i64("index_0", &[], vec![0]);
            let first = b.op(
                "Gather",
                &[&x, &first],
                vec![AttributeProto::int("axis", 1)],
            );
            let (dense, out) = if family.is_roberta() {
                ("classifier.dense".to_string(), "classifier.out_proj")
            } else {
                (b.encoder("pooler.dense"), "classifier")
            };
            let y = b.linear(&first, &dense, h, h)?;
            let y = b.op("Tanh", &[&y], vec![]);
            let y = b.linear(&y, out, h, n)?;
            b.node("Identity", &[&y], &["logits"], vec![]);
        }
    }
    let mut model = std::mem::take(&mut b.g).build();
    name_dimensions(&mut model);
    Ok(model)
}

/// Names the dynamic dimensions of the inputs and outputs as exporters do: `batch_size`, `sequence_length`.
fn name_dimensions(model: &mut ModelProto) {
    let Some(graph) = model.graph.as_mut() else {
        return;
    };
    for value in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        let dims = value
            .r#type
            .as_mut()
            .and_then(|t| t.tensor_type.as_mut())
            .and_then(|t| t.shape.as_mut());
        for (i, dim) in dims.into_iter().flat_map(|s| s.dim.iter_mut()).enumerate() {
            if dim.dim_param.is_some() {
                dim.dim_param = Some(
                    if i == 0 {
                        "batch_size"
                    } else {
                        "sequence_length"
                    }
                    .into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(config: &str, weights: Option<Vec<u8>>) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-hf-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        if let Some(w) = weights {
            std::fs::write(dir.join("model.safetensors"), w).unwrap();
        }
        dir
    }

    #[test]
    fn weights_files_larger_than_the_limit_are_refused_before_they_are_read() {
        // A sparse 64 GiB file beside a tiny config.json: it takes no disk, but reading it whole would take 64 GiB
        // of memory.
        let dir = folder(TINY, None);
        let file = std::fs::File::create(dir.join("model.safetensors")).unwrap();
        file.set_len(64 << 30).unwrap();
        let e = import_with_limit(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("more than the 2097152 bytes allowed"), "{e}");
        // And so is a huge config.json.
        std::fs::File::create(dir.join("config.json"))
            .unwrap()
            .set_len(64 << 30)
            .unwrap();
        let e = import_with_limit(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("larger than the 16777216 bytes allowed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const TINY: &str = r#"{"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 10, "hidden_size": 4,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6,
        "type_vocab_size": 2}"#;

    /// Every weight of [`TINY`], with or without `bert.`, filled with `0.01`.
    fn tiny_weights(
        prefix: &str,
        skip: Option<&str>,
        reshape: Option<(&str, Vec<usize>)>,
    ) -> Vec<u8> {
        let mut entries: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![10, 4]),
            ("embeddings.position_embeddings.weight".into(), vec![6, 4]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, 4]),
            ("embeddings.LayerNorm.weight".into(), vec![4]),
            ("embeddings.LayerNorm.bias".into(), vec![4]),
        ];
        let l = "encoder.layer.0";
        for (name, out, inp) in [
            ("attention.self.query", 4, 4),
            ("attention.self.key", 4, 4),
            ("attention.self.value", 4, 4),
            ("attention.output.dense", 4, 4),
            ("intermediate.dense", 8, 4),
            ("output.dense", 4, 8),
        ] {
            entries.push((format!("{l}.{name}.weight"), vec![out, inp]));
            entries.push((format!("{l}.{name}.bias"), vec![out]));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            entries.push((format!("{l}.{name}.weight"), vec![4]));
            entries.push((format!("{l}.{name}.bias"), vec![4]));
        }
        let entries: Vec<(String, &str, Vec<usize>, Vec<u8>)> = entries
            .into_iter()
            .filter(|(n, _)| Some(n.as_str()) != skip)
            .map(|(n, shape)| {
                let shape = match &reshape {
                    Some((r, s)) if *r == n => s.clone(),
                    _ => shape,
                };
                let count: usize = shape.iter().product();
                let bytes = (0..count).flat_map(|_| 0.01f32.to_le_bytes()).collect();
                (format!("{prefix}{n}"), "F32", shape, bytes)
            })
            .collect();
        let borrowed: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = entries
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        safetensors::tests::file(&borrowed)
    }

    #[test]
    fn builds_a_tiny_bert_with_or_without_the_prefix() {
        for prefix in ["", "bert."] {
            let dir = folder(TINY, Some(tiny_weights(prefix, None, None)));
            let imported = import(&dir).unwrap();
            assert_eq!(imported.kind, ModelKind::Embedding);
            assert_eq!(
                imported.inputs,
                ["input_ids", "attention_mask", "token_type_ids"]
            );
            assert_eq!(imported.output, "last_hidden_state");
            assert_eq!(imported.hidden_size, 4);
            let model = ModelProto::decode(imported.onnx.as_slice()).unwrap();
            let graph = model.graph.unwrap();
            let dims: Vec<_> = graph.output[0]
                .r#type
                .clone()
                .unwrap()
                .tensor_type
                .unwrap()
                .shape
                .unwrap()
                .dim
                .into_iter()
                .map(|d| (d.dim_param, d.dim_value))
                .collect();
            assert_eq!(
                dims,
                [
                    (Some("batch_size".to_string()), None),
                    (Some("sequence_length".to_string()), None),
                    (None, Some(4))
                ]
            );
            let mut names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
            names.sort();
            let count = names.len();
            names.dedup();
            assert_eq!(names.len(), count, "initializer names are unique");
            // Weights are named as in the checkpoint.
            assert!(graph
                .initializer
                .iter()
                .any(|t| t.name == format!("{prefix}encoder.layer.0.attention.self.query.weight")));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn names_missing_and_misshapen_weights() {
        let dir = folder(
            TINY,
            Some(tiny_weights(
                "",
                Some("encoder.layer.0.output.dense.bias"),
                None,
            )),
        );
        let err = import(&dir).unwrap_err().to_string();
        assert_eq!(err, "the weights have no `encoder.layer.0.output.dense.bias`, which the encoder.layer.0.output.dense layer needs (is this checkpoint a bert model?)");
        std::fs::remove_dir_all(dir).unwrap();
        let dir = folder(
            TINY,
            Some(tiny_weights(
                "",
                None,
                Some(("encoder.layer.0.intermediate.dense.weight", vec![4, 8])),
            )),
        );
        let err = import(&dir).unwrap_err().to_string();
        assert_eq!(err, "weight `encoder.layer.0.intermediate.dense.weight` has shape [4, 8], but config.json implies [8, 4]");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_too_large_models_before_reading_weights() {
        let dir = folder(TINY, None);
        let err = import_with_limit(&dir, 100).unwrap_err();
        assert!(matches!(err, HfError::TooLarge { limit: 100, .. }), "{err}");
        let err = import(&dir).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
        std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
        let err = import(&dir).unwrap_err().to_string();
        assert!(
            err.ends_with("but pytorch_model.bin; Ferry reads safetensors weights only"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
        let big = TINY.replace("\"vocab_size\": 10", "\"vocab_size\": 2000000");
        let big = big.replace("\"hidden_size\": 4", "\"hidden_size\": 1024");
        let big = big.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 16");
        let dir = folder(&big, None);
        let err = import(&dir).unwrap_err().to_string();
        assert!(err.contains("external data"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
