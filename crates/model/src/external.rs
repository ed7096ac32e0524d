//! ONNX external data: tensors whose bytes live in another file (`data_location = EXTERNAL`, with a `location`
//! relative to the model file).
//!
//! Models over 2 GB must keep their weights this way (protobuf cannot hold more). Ferry loads external data only
//! from files inside the version directory: every model is scanned before an engine sees it ([`external_files`]),
//! and a location that would reach outside the version directory (an absolute path, a `..` component, a symbolic
//! link that leads out) is refused, since it can only be a mistake or an attack. The files found are what the
//! server counts against its size limit; the engine is then told the version directory, since a model loaded
//! from memory would otherwise have its locations resolved against the process's working directory.
//!
//! The scan decodes a skeleton of `onnx.ModelProto` (only the fields that can hold a tensor, so weights are
//! skipped, never copied) and walks every tensor: graph initializers, sparse initializers, node attributes
//! (`Constant` values), subgraphs of `If`/`Loop`/`Scan` at any depth, model-local functions and training graphs.

use std::path::{Component, Path, PathBuf};

use prost::Message;

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// One tensor that keeps its data in another file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalTensor {
    /// The tensor's name (empty for an unnamed attribute tensor).
    pub tensor: String,
    /// Its `location` entry (empty when missing).
    pub location: String,
}

/// Why a model cannot be served as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalDataError {
    /// The bytes are not an ONNX model (worded as engines word a model they cannot load).
    #[error("model failed to load: model.onnx is not an ONNX model ({0})")]
    Malformed(String),
    /// A tensor's external data would be read from outside the version directory.
    #[error("model.onnx: tensor `{tensor}` has its data at `{location}`, outside the version directory ({why}): refused")]
    Escapes {
        /// The tensor.
        tensor: String,
        /// The location it names.
        location: String,
        /// Which rule it breaks (shown inside the message, so not a `#[source]`: a chain would repeat it).
        why: LocationError,
    },
    /// A tensor keeps its data in another file, which the chosen engine does not load (only ONNX Runtime does).
    #[error("model.onnx: tensor `{tensor}` keeps its data in an external file (`{location}`), which only the ONNX Runtime engine loads: serve it with engine = \"onnxruntime\", or save the model with its weights inside model.onnx (in Python, onnx.save_model(model, path, save_as_external_data=False))")]
    Unsupported {
        /// The tensor.
        tensor: String,
        /// The location it names.
        location: String,
    },
}

/// Which rule an external-data `location` breaks ([`check_location`]); each text completes "outside the version
/// directory (...)".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    /// An empty location.
    #[error("no location")]
    Empty,
    /// A location holding a NUL character.
    #[error("a NUL character")]
    Nul,
    /// A backslash or a drive prefix (a path on Windows, where ONNX Runtime would follow it).
    #[error("a backslash or drive prefix")]
    WindowsPath,
    /// A `..` component.
    #[error("a `..` component")]
    ParentDir,
    /// An absolute path.
    #[error("an absolute path")]
    Absolute,
    /// An existing file whose real path cannot be worked out.
    #[error("a path that cannot be resolved")]
    Unresolvable,
    /// A symbolic link (or a path through one) that resolves outside the directory.
    #[error("a symbolic link to {}", .0.display())]
    SymlinkOutside(PathBuf),
}

/// Lists every tensor of a serialized model that keeps its data in an external file.
pub fn external_tensors(model: &[u8]) -> Result<Vec<ExternalTensor>, ExternalDataError> {
    let model =
        SkeletonModel::decode(model).map_err(|e| ExternalDataError::Malformed(e.to_string()))?;
    let mut found = Vec::new();
    let mut graphs: Vec<&SkeletonGraph> = Vec::new();
    let mut nodes: Vec<&SkeletonNode> = Vec::new();
    graphs.extend(model.graph.as_ref());
    for t in &model.training_info {
        graphs.extend(t.initialization.as_ref());
        graphs.extend(t.algorithm.as_ref());
    }
    for f in &model.functions {
        nodes.extend(&f.node);
    }
    // An explicit stack rather than recursion: decoding already bounds the depth (prost's recursion limit), but
    // the walk should not depend on it.
    loop {
        if let Some(graph) = graphs.pop() {
            for t in &graph.initializer {
                note(t, &mut found);
            }
            for s in &graph.sparse_initializer {
                s.values
                    .iter()
                    .chain(&s.indices)
                    .for_each(|t| note(t, &mut found));
            }
            nodes.extend(&graph.node);
        } else if let Some(node) = nodes.pop() {
            for a in &node.attribute {
                a.t.iter()
                    .chain(&a.tensors)
                    .for_each(|t| note(t, &mut found));
                for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
                    s.values
                        .iter()
                        .chain(&s.indices)
                        .for_each(|t| note(t, &mut found));
                }
                graphs.extend(a.g.iter().chain(&a.graphs));
            }
        } else {
            break;
        }
    }
    Ok(found)
}

fn note(t: &SkeletonTensor, found: &mut Vec<ExternalTensor>) {
    if t.data_location == EXTERNAL || !t.external_data.is_empty() {
        let location = t
            .external_data
            .iter()
            .find(|e| e.key == b"location")
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            .unwrap_or_default();
        found.push(ExternalTensor {
            tensor: String::from_utf8_lossy(&t.name).into_owned(),
            location,
        });
    }
}

/// Checks that an external-data `location` names a file inside `dir` (the version directory): relative, no `..`,
/// no backslashes or drive prefixes, and, when `dir` is given and the file exists, not a symbolic link (or through
/// one) that resolves outside `dir`. The error says which rule it breaks.
pub fn check_location(location: &str, dir: Option<&Path>) -> Result<(), LocationError> {
    if location.is_empty() {
        return Err(LocationError::Empty);
    }
    if location.contains('\0') {
        return Err(LocationError::Nul);
    }
    // Backslashes and drive letters mean paths on Windows, where ONNX Runtime would follow them.
    if location.contains('\\') || location.contains(':') {
        return Err(LocationError::WindowsPath);
    }
    let path = Path::new(location);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(LocationError::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(LocationError::Absolute),
        }
    }
    if let Some(dir) = dir {
        let target = dir.join(path);
        if std::fs::symlink_metadata(&target).is_ok() {
            let (Ok(root), Ok(real)) = (dir.canonicalize(), target.canonicalize()) else {
                return Err(LocationError::Unresolvable);
            };
            if !real.starts_with(&root) {
                return Err(LocationError::SymlinkOutside(real));
            }
        }
    }
    Ok(())
}

/// The files a model's external data is read from, each once, as paths relative to `dir` (the version directory),
/// in the order first named; empty for a self-contained model. [`ExternalDataError::Escapes`] when any location
/// leads outside `dir` (see [`check_location`]). Whether the files exist is left to the caller.
pub fn external_files(model: &[u8], dir: Option<&Path>) -> Result<Vec<PathBuf>, ExternalDataError> {
    let external = external_tensors(model)?;
    let mut files: Vec<PathBuf> = Vec::new();
    for t in &external {
        check_location(&t.location, dir).map_err(|why| ExternalDataError::Escapes {
            tensor: t.tensor.clone(),
            location: t.location.clone(),
            why,
        })?;
        // `./w.bin` and `w.bin` are one file.
        let path: PathBuf = Path::new(&t.location)
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// Refuses a model that keeps any tensor's data in an external file (for engines that load only self-contained
/// models): [`ExternalDataError::Escapes`] when its location leads outside `dir` (see [`check_location`]), else
/// [`ExternalDataError::Unsupported`].
pub fn check_self_contained(model: &[u8], dir: Option<&Path>) -> Result<(), ExternalDataError> {
    external_files(model, dir)?;
    match external_tensors(model)?.into_iter().next() {
        None => Ok(()),
        Some(t) => Err(ExternalDataError::Unsupported {
            tensor: t.tensor,
            location: t.location,
        }),
    }
}

// The skeleton: field numbers from `onnx/onnx.proto`; every other field is skipped by the decoder. Strings are read
// as bytes: ONNX Runtime's parser does not insist on UTF-8, so neither does the scan.

#[derive(Clone, PartialEq, Message)]
struct SkeletonModel {
    #[prost(message, optional, tag = "7")]
    graph: Option<SkeletonGraph>,
    #[prost(message, repeated, tag = "20")]
    training_info: Vec<SkeletonTrainingInfo>,
    #[prost(message, repeated, tag = "25")]
    functions: Vec<SkeletonFunction>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonTrainingInfo {
    #[prost(message, optional, tag = "1")]
    initialization: Option<SkeletonGraph>,
    #[prost(message, optional, tag = "2")]
    algorithm: Option<SkeletonGraph>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonFunction {
    #[prost(message, repeated, tag = "7")]
    node: Vec<SkeletonNode>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonGraph {
    #[prost(message, repeated, tag = "1")]
    node: Vec<SkeletonNode>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<SkeletonTensor>,
    #[prost(message, repeated, tag = "15")]
    sparse_initializer: Vec<SkeletonSparse>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonNode {
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<SkeletonAttribute>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonAttribute {
    #[prost(message, optional, tag = "5")]
    t: Option<SkeletonTensor>,
    #[prost(message, optional, tag = "6")]
    g: Option<SkeletonGraph>,
    #[prost(message, repeated, tag = "10")]
    tensors: Vec<SkeletonTensor>,
    #[prost(message, repeated, tag = "11")]
    graphs: Vec<SkeletonGraph>,
    #[prost(message, optional, tag = "22")]
    sparse_tensor: Option<SkeletonSparse>,
    #[prost(message, repeated, tag = "23")]
    sparse_tensors: Vec<SkeletonSparse>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonSparse {
    #[prost(message, optional, tag = "1")]
    values: Option<SkeletonTensor>,
    #[prost(message, optional, tag = "2")]
    indices: Option<SkeletonTensor>,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonTensor {
    #[prost(bytes = "vec", tag = "8")]
    name: Vec<u8>,
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<SkeletonEntry>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
struct SkeletonEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{AttributeProto, GraphBuilder, TensorProto};
    use crate::DataType;

    /// `y = x + w`, with `w` an initializer built by `w`.
    fn model(w: TensorProto) -> Vec<u8> {
        GraphBuilder::new("g")
            .input("x", DataType::F32, Some(&[4]))
            .output("y", DataType::F32, Some(&[4]))
            .initializer(w)
            .node("Add", &["x", "w"], &["y"], vec![])
            .to_bytes()
    }

    fn external(location: &str) -> Vec<u8> {
        model(TensorProto::external("w", DataType::F32, &[4], location))
    }

    #[test]
    fn self_contained_models_pass() {
        let bytes = model(TensorProto::f32("w", &[4], vec![1.0; 4]));
        assert_eq!(external_tensors(&bytes), Ok(vec![]));
        assert_eq!(check_self_contained(&bytes, None), Ok(()));
    }

    #[test]
    fn external_data_that_escapes_the_directory_is_refused_as_such() {
        for (location, why) in [("../../etc/passwd", "`..`"), ("/etc/passwd", "absolute")] {
            let err = check_self_contained(&external(location), None).unwrap_err();
            let ExternalDataError::Escapes {
                tensor, why: said, ..
            } = &err
            else {
                panic!("{location}: {err}");
            };
            assert_eq!(tensor, "w");
            assert!(said.to_string().contains(why), "{location}: {err}");
            assert!(
                err.to_string().contains("outside the version directory"),
                "{err}"
            );
        }
    }

    #[test]
    fn external_data_inside_the_directory_is_refused_as_unsupported() {
        let err = check_self_contained(&external("weights.bin"), None).unwrap_err();
        assert!(
            matches!(err, ExternalDataError::Unsupported { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("save_as_external_data=False"),
            "{err}"
        );
        assert_eq!(
            external_files(&external("weights.bin"), None),
            Ok(vec![PathBuf::from("weights.bin")])
        );
    }

    #[test]
    fn each_external_file_is_listed_once() {
        let bytes = GraphBuilder::new("g")
            .input("x", DataType::F32, Some(&[4]))
            .output("y", DataType::F32, Some(&[4]))
            .initializer(TensorProto::external_range(
                "a",
                DataType::F32,
                &[4],
                "w.bin",
                0,
                16,
            ))
            .initializer(TensorProto::external_range(
                "b",
                DataType::F32,
                &[4],
                "./w.bin",
                16,
                16,
            ))
            .initializer(TensorProto::external(
                "c",
                DataType::F32,
                &[4],
                "data/c.bin",
            ))
            .node("Add", &["x", "a"], &["t"], vec![])
            .node("Add", &["t", "b"], &["u"], vec![])
            .node("Add", &["u", "c"], &["y"], vec![])
            .to_bytes();
        assert_eq!(
            external_files(&bytes, None),
            Ok(vec![PathBuf::from("w.bin"), PathBuf::from("data/c.bin")])
        );
    }

    #[test]
    fn external_data_in_a_constant_node_is_found() {
        let bytes = GraphBuilder::new("g")
            .output("y", DataType::F32, Some(&[4]))
            .node(
                "Constant",
                &[],
                &["y"],
                vec![AttributeProto::tensor(
                    "value",
                    TensorProto::external("c", DataType::F32, &[4], "/etc/shadow"),
                )],
            )
            .to_bytes();
        let found = external_tensors(&bytes).unwrap();
        assert_eq!(found[0].location, "/etc/shadow");
        assert!(matches!(
            check_self_contained(&bytes, None),
            Err(ExternalDataError::Escapes { .. })
        ));
    }

    #[test]
    fn external_data_in_nested_subgraphs_functions_and_training_graphs_is_found() {
        let tensor = |location: &str| SkeletonTensor {
            name: location.into(),
            external_data: vec![SkeletonEntry {
                key: b"location".to_vec(),
                value: location.into(),
            }],
            data_location: EXTERNAL,
        };
        let graph_with = |node: SkeletonNode| SkeletonGraph {
            node: vec![node],
            initializer: vec![],
            sparse_initializer: vec![],
        };
        // An `If` whose else-branch holds a `Loop` whose body holds a sparse constant.
        let inner = graph_with(SkeletonNode {
            attribute: vec![SkeletonAttribute {
                sparse_tensor: Some(SkeletonSparse {
                    values: Some(tensor("../deep")),
                    indices: None,
                }),
                ..Default::default()
            }],
        });
        let outer = graph_with(SkeletonNode {
            attribute: vec![SkeletonAttribute {
                graphs: vec![inner],
                ..Default::default()
            }],
        });
        let model = SkeletonModel {
            graph: Some(graph_with(SkeletonNode {
                attribute: vec![SkeletonAttribute {
                    g: Some(outer),
                    ..Default::default()
                }],
            })),
            training_info: vec![SkeletonTrainingInfo {
                initialization: Some(SkeletonGraph {
                    initializer: vec![tensor("train.bin")],
                    ..Default::default()
                }),
                algorithm: None,
            }],
            functions: vec![SkeletonFunction {
                node: vec![SkeletonNode {
                    attribute: vec![SkeletonAttribute {
                        tensors: vec![tensor("fn.bin")],
                        ..Default::default()
                    }],
                }],
            }],
        };
        let mut found: Vec<String> = external_tensors(&model.encode_to_vec())
            .unwrap()
            .into_iter()
            .map(|t| t.location)
            .collect();
        found.sort();
        assert_eq!(found, ["../deep", "fn.bin", "train.bin"]);
    }

    #[test]
    fn names_need_not_be_utf8() {
        let model = SkeletonModel {
            graph: Some(SkeletonGraph {
                initializer: vec![SkeletonTensor {
                    name: vec![0xff, b'w'],
                    external_data: vec![SkeletonEntry {
                        key: b"location".to_vec(),
                        value: vec![b'/', 0xfe],
                    }],
                    data_location: EXTERNAL,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let found = external_tensors(&model.encode_to_vec()).unwrap();
        assert_eq!(found[0].tensor, "\u{fffd}w");
        assert!(matches!(
            check_self_contained(&model.encode_to_vec(), None),
            Err(ExternalDataError::Escapes { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            external_tensors(b"\x0a\xff\xff\xff\xff\x0f"),
            Err(ExternalDataError::Malformed(_))
        ));
        // A deep nest of subgraphs stops at the decoder's recursion limit.
        let mut bytes = Vec::new();
        for _ in 0..200 {
            // AttributeProto.g (6) inside NodeProto.attribute (5) inside GraphProto.node (1), innermost first.
            let wrap = |tag: u8, inner: &[u8]| {
                let mut v = vec![(tag << 3) | 2];
                prost::encoding::encode_varint(inner.len() as u64, &mut v);
                v.extend_from_slice(inner);
                v
            };
            bytes = wrap(1, &wrap(5, &wrap(6, &bytes)));
        }
        let model = [
            &[(7u8 << 3) | 2][..],
            &{
                let mut v = Vec::new();
                prost::encoding::encode_varint(bytes.len() as u64, &mut v);
                v
            },
            &bytes,
        ]
        .concat();
        assert!(matches!(
            external_tensors(&model),
            Err(ExternalDataError::Malformed(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_out_of_the_directory_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-external-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("w.bin"));
        std::os::unix::fs::symlink("/etc/passwd", dir.join("w.bin")).unwrap();
        std::fs::write(dir.join("inside.bin"), b"1234").unwrap();
        let e = check_location("w.bin", Some(&dir)).unwrap_err();
        assert!(
            matches!(e, LocationError::SymlinkOutside(_))
                && e.to_string().contains("symbolic link"),
            "{e}"
        );
        assert_eq!(check_location("inside.bin", Some(&dir)), Ok(()));
        assert_eq!(check_location("missing.bin", Some(&dir)), Ok(()));
        let err = check_self_contained(&external("w.bin"), Some(&dir)).unwrap_err();
        assert!(matches!(err, ExternalDataError::Escapes { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn locations_inside_the_directory_pass_and_the_rest_say_why() {
        for good in ["weights.bin", "data/w.bin", "./w.bin", "a..b"] {
            assert_eq!(check_location(good, None), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("../../etc/passwd", "`..`"),
            ("data/../../x", "`..`"),
            ("/etc/passwd", "absolute"),
            ("..\\x", "backslash"),
            ("C:/x", "drive"),
            ("", "no location"),
            ("a\0b", "NUL"),
        ] {
            let e = check_location(bad, None).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
