//! A model's inputs and outputs as the server publishes them, read from the ONNX file.

use crate::tensor::DataType;

/// One input or output: name, datatype and shape, with `-1` for a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its element type.
    pub datatype: DataType,
    /// Its dimensions; `-1` where any size is accepted.
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether dimension 0 is dynamic, so requests can be stacked along it.
    pub fn has_dynamic_batch_dim(&self) -> bool {
        self.shape.first().is_some_and(|&d| d < 0)
    }

    /// Whether a concrete `shape` fits this spec (same rank, fixed dimensions equal).
    pub fn accepts_shape(&self, shape: &[i64]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| got >= 0 && (want < 0 || want == got))
    }
}

/// A model's inputs and outputs, in graph order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The inputs, each of which a request must supply exactly once.
    pub inputs: Vec<TensorSpec>,
    /// The outputs the model produces.
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    /// Whether every input and output has a dynamic first dimension, the condition for batching.
    pub fn supports_batching(&self) -> bool {
        !self.inputs.is_empty()
            && self
                .inputs
                .iter()
                .chain(&self.outputs)
                .all(TensorSpec::has_dynamic_batch_dim)
    }

    /// The input named `name`, with its position.
    pub fn input(&self, name: &str) -> Option<(usize, &TensorSpec)> {
        self.inputs.iter().enumerate().find(|(_, s)| s.name == name)
    }

    /// The output named `name`, with its position.
    pub fn output(&self, name: &str) -> Option<(usize, &TensorSpec)> {
        self.outputs
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shapes_match_fixed_and_dynamic_dimensions() {
        let s = spec(&[-1, 32]);
        assert!(s.accepts_shape(&[1, 32]));
        assert!(s.accepts_shape(&[64, 32]));
        assert!(!s.accepts_shape(&[1, 31]));
        assert!(!s.accepts_shape(&[32]));
        assert!(!s.accepts_shape(&[1, 32, 1]));
        assert!(!s.accepts_shape(&[-1, 32]));
    }

    #[test]
    fn batching_needs_every_tensor_dynamic_in_dimension_zero() {
        let dynamic = Signature {
            inputs: vec![spec(&[-1, 4])],
            outputs: vec![spec(&[-1, 2])],
        };
        assert!(dynamic.supports_batching());
        let fixed_output = Signature {
            inputs: vec![spec(&[-1, 4])],
            outputs: vec![spec(&[2])],
        };
        assert!(!fixed_output.supports_batching());
    }
}
