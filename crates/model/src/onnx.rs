//! The subset of the ONNX protobuf schema (`onnx.proto`, IR version 8) that Ferry writes, and a builder for graphs.
//!
//! Field numbers follow the published `onnx/onnx.proto`; fields Ferry never writes are left out,
//! which protobuf allows. Tests build their models with [`GraphBuilder`]; `ferry train` exports through it.

use crate::DataType;
use prost::Message;

/// `onnx.ModelProto`.
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    /// The IR version of the file format.
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    /// The operator sets the graph uses.
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// The tool that wrote the model.
    #[prost(string, tag = "2")]
    pub producer_name: String,
    /// Its version.
    #[prost(string, tag = "3")]
    pub producer_version: String,
    /// The model's own version number.
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    /// Free text.
    #[prost(string, tag = "6")]
    pub doc_string: String,
    /// The graph.
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    /// Named strings attached to the model.
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `onnx.OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    /// The domain; empty is the default `ai.onnx` domain.
    #[prost(string, tag = "1")]
    pub domain: String,
    /// The opset version.
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `onnx.StringStringEntryProto`.
#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `onnx.GraphProto`.
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    /// Nodes in topological order.
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// The graph name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Constant tensors (weights).
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// Free text.
    #[prost(string, tag = "10")]
    pub doc_string: String,
    /// Graph inputs.
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// Graph outputs.
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `onnx.NodeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    /// Input value names.
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// Output value names.
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// The node name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// The operator.
    #[prost(string, tag = "4")]
    pub op_type: String,
    /// The attributes.
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    /// The operator domain; empty for `ai.onnx`.
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `onnx.AttributeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    /// The attribute name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// A float value.
    #[prost(float, tag = "2")]
    pub f: f32,
    /// An integer value.
    #[prost(int64, tag = "3")]
    pub i: i64,
    /// A string value.
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    /// A tensor value.
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    /// Float values.
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    /// Integer values.
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// String values.
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    /// The `AttributeType` code of the value that is set.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

impl AttributeProto {
    /// A float attribute.
    pub fn float(name: &str, f: f32) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            f,
            r#type: 1,
            ..Default::default()
        }
    }
    /// An integer attribute.
    pub fn int(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i,
            r#type: 2,
            ..Default::default()
        }
    }
    /// A string attribute.
    pub fn string(name: &str, s: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            s: s.as_bytes().to_vec(),
            r#type: 3,
            ..Default::default()
        }
    }
    /// A tensor attribute.
    pub fn tensor(name: &str, t: TensorProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            t: Some(t),
            r#type: 4,
            ..Default::default()
        }
    }
    /// A list-of-floats attribute.
    pub fn floats(name: &str, floats: Vec<f32>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            floats,
            r#type: 6,
            ..Default::default()
        }
    }
    /// A list-of-integers attribute.
    pub fn ints(name: &str, ints: Vec<i64>) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints,
            r#type: 7,
            ..Default::default()
        }
    }
    /// A list-of-strings attribute.
    pub fn strings(name: &str, strings: &[&str]) -> AttributeProto {
        let strings = strings.iter().map(|s| s.as_bytes().to_vec()).collect();
        AttributeProto {
            name: name.into(),
            strings,
            r#type: 8,
            ..Default::default()
        }
    }
}

/// `onnx.TensorProto`, for initializers and tensor attributes.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// The dimensions.
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// The `DataType` code.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    /// FP32 elements.
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    /// INT32 (and narrower integer, BOOL and FP16 bit patterns) elements.
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    /// STRING elements.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub string_data: Vec<Vec<u8>>,
    /// INT64 elements.
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    /// The tensor name (for initializers, the value it defines).
    #[prost(string, tag = "8")]
    pub name: String,
    /// Elements as little-endian bytes, for any fixed-size type.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// FP64 elements.
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    /// Where the data lives when `data_location` is EXTERNAL (`location`, `offset`, `length`; see
    /// [`crate::external`]).
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    /// `DEFAULT` (0, data in this message) or `EXTERNAL` (1, data in another file).
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

impl TensorProto {
    /// A float tensor.
    pub fn f32(name: &str, dims: &[i64], values: Vec<f32>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::F32.onnx_code(),
            float_data: values,
            ..Default::default()
        }
    }
    /// An int64 tensor.
    pub fn i64(name: &str, dims: &[i64], values: Vec<i64>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::I64.onnx_code(),
            int64_data: values,
            ..Default::default()
        }
    }
    /// A tensor whose data is the `length` bytes at `offset` of another file, `location` relative to the model.
    pub fn external_range(
        name: &str,
        dtype: DataType,
        dims: &[i64],
        location: &str,
        offset: u64,
        length: u64,
    ) -> TensorProto {
        let mut t = TensorProto::external(name, dtype, dims, location);
        for (key, value) in [("offset", offset), ("length", length)] {
            t.external_data.push(StringStringEntryProto {
                key: key.into(),
                value: value.to_string(),
            });
        }
        t
    }
    /// A tensor whose data is another whole file, `location` relative to the model.
    pub fn external(name: &str, dtype: DataType, dims: &[i64], location: &str) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dtype.onnx_code(),
            external_data: vec![StringStringEntryProto {
                key: "location".into(),
                value: location.into(),
            }],
            data_location: 1,
            ..Default::default()
        }
    }
    /// A tensor of any fixed-size type from its little-endian bytes.
    pub fn raw(name: &str, dtype: DataType, dims: &[i64], raw_data: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dtype.onnx_code(),
            raw_data,
            ..Default::default()
        }
    }
}

/// `onnx.ValueInfoProto`.
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    /// The value name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its type.
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `onnx.TypeProto`, restricted to tensor types.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    /// The tensor type.
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

/// `onnx.TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProtoTensor {
    /// The `DataType` code of the elements.
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    /// The shape; absent when even the rank is unknown.
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `onnx.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    /// The dimensions.
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `onnx.TensorShapeProto.Dimension`.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    /// A fixed size.
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    /// A symbolic size.
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// Builds an ONNX graph one node at a time.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    opsets: Vec<OperatorSetIdProto>,
    metadata: Vec<StringStringEntryProto>,
}

impl GraphBuilder {
    /// A new graph using the default domain at opset 17.
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
            opsets: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            metadata: Vec::new(),
        }
    }

    /// Also imports `domain` at `version` (for example `ai.onnx.ml`, 3).
    pub fn opset(mut self, domain: &str, version: i64) -> GraphBuilder {
        self.opsets.push(OperatorSetIdProto {
            domain: domain.into(),
            version,
        });
        self
    }

    fn value_info(name: &str, dtype: DataType, dims: Option<&[i64]>) -> ValueInfoProto {
        let shape = dims.map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    if *d < 0 {
                        Dimension {
                            dim_value: None,
                            dim_param: Some(if i == 0 { "N".into() } else { format!("d{i}") }),
                        }
                    } else {
                        Dimension {
                            dim_value: Some(*d),
                            dim_param: None,
                        }
                    }
                })
                .collect(),
        });
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: dtype.onnx_code(),
                    shape,
                }),
            }),
        }
    }

    /// Declares a graph input; `-1` marks a dynamic dimension, `None` an unknown rank.
    pub fn input(mut self, name: &str, dtype: DataType, dims: Option<&[i64]>) -> GraphBuilder {
        self.graph.input.push(Self::value_info(name, dtype, dims));
        self
    }

    /// Declares a graph output.
    pub fn output(mut self, name: &str, dtype: DataType, dims: Option<&[i64]>) -> GraphBuilder {
        self.graph.output.push(Self::value_info(name, dtype, dims));
        self
    }

    /// Adds a constant tensor.
    pub fn initializer(mut self, tensor: TensorProto) -> GraphBuilder {
        self.graph.initializer.push(tensor);
        self
    }

    /// Adds a node of the default domain.
    pub fn node(
        self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> GraphBuilder {
        self.node_in(String::new().as_str(), op_type, inputs, outputs, attributes)
    }

    /// Adds a node of the given domain.
    pub fn node_in(
        mut self,
        domain: &str,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> GraphBuilder {
        let name = format!("{op_type}_{}", self.graph.node.len());
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op_type.into(),
            attribute,
            domain: domain.into(),
        });
        self
    }

    /// Attaches a named string to the model.
    pub fn metadata(mut self, key: &str, value: &str) -> GraphBuilder {
        self.metadata.push(StringStringEntryProto {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// The finished model.
    pub fn build(self) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: self.opsets,
            producer_name: "ferry".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            model_version: 0,
            doc_string: String::new(),
            graph: Some(self.graph),
            metadata_props: self.metadata,
        }
    }

    /// The finished model, serialized.
    pub fn to_bytes(self) -> Vec<u8> {
        self.build().encode_to_vec()
    }
}
