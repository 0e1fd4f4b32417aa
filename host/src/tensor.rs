//! The one tensor type of meshserve: a name, an OIP datatype, a shape and little-endian bytes.
//!
//! Every front door (JSON, the binary extension, plugins, the mesh wire) converts to and from
//! this type, and the engine hands it to ONNX Runtime. Elements are stored exactly as the
//! OIP binary tensor extension lays them out: fixed-size types as packed little-endian
//! values, BOOL as one byte each, BYTES as a 4-byte little-endian length before each element.
//! That makes the binary extension a zero-copy path and batching a byte concatenation.

use bytes::Bytes;
use std::fmt;

/// An Open Inference Protocol datatype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// One byte per element, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE 754 half precision (carried, not converted: ONNX Runtime needs the `half` crate for it).
    Fp16,
    /// IEEE 754 single precision.
    Fp32,
    /// IEEE 754 double precision.
    Fp64,
    /// Variable-length byte strings.
    Bytes,
}

impl DataType {
    /// Every datatype, for tables and exhaustive tests.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The OIP spelling, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses the OIP spelling.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element, or `None` for BYTES, whose elements vary in size.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tensor's bytes do not match its datatype and shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The shape has a negative dimension or overflows.
    #[error("tensor '{name}': invalid shape {shape:?}")]
    InvalidShape {
        /// The tensor's name.
        name: String,
        /// The offending shape.
        shape: Vec<i64>,
    },
    /// The byte length does not match shape × element size.
    #[error("tensor '{name}': {datatype} shape {shape:?} needs {expected} bytes, got {actual}")]
    ByteLength {
        /// The tensor's name.
        name: String,
        /// Its datatype.
        datatype: DataType,
        /// Its shape.
        shape: Vec<i64>,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// BYTES data whose length prefixes do not add up to the buffer or the element count.
    #[error(
        "tensor '{name}': BYTES data holds {actual} elements (or is truncated), shape {shape:?} needs {expected}"
    )]
    BytesElements {
        /// The tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<i64>,
        /// Elements the shape needs.
        expected: usize,
        /// Complete elements found.
        actual: usize,
    },
}

/// A named tensor with its data in OIP binary layout (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The input or output name.
    pub name: String,
    /// The element type.
    pub datatype: DataType,
    /// Dimensions; all non-negative once validated.
    pub shape: Vec<i64>,
    /// Elements in OIP binary layout.
    pub data: Bytes,
}

impl Tensor {
    /// Builds a tensor and checks that `data` is exactly what `datatype` and `shape` describe.
    pub fn new(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<i64>,
        data: Bytes,
    ) -> Result<Tensor, TensorError> {
        let tensor = Tensor {
            name: name.into(),
            datatype,
            shape,
            data,
        };
        tensor.validate()?;
        Ok(tensor)
    }

    /// Number of elements the shape describes, or `None` if a dimension is negative or the product overflows.
    pub fn element_count_of(shape: &[i64]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }

    /// Number of elements.
    pub fn element_count(&self) -> Result<usize, TensorError> {
        Tensor::element_count_of(&self.shape).ok_or_else(|| TensorError::InvalidShape {
            name: self.name.clone(),
            shape: self.shape.clone(),
        })
    }

    /// Checks the data against datatype and shape.
    pub fn validate(&self) -> Result<(), TensorError> {
        let count = self.element_count()?;
        match self.datatype.element_size() {
            Some(size) => {
                let expected =
                    count
                        .checked_mul(size)
                        .ok_or_else(|| TensorError::InvalidShape {
                            name: self.name.clone(),
                            shape: self.shape.clone(),
                        })?;
                if expected != self.data.len() {
                    return Err(TensorError::ByteLength {
                        name: self.name.clone(),
                        datatype: self.datatype,
                        shape: self.shape.clone(),
                        expected,
                        actual: self.data.len(),
                    });
                }
            }
            None => {
                let actual = BytesElements::new(&self.data).try_count();
                if actual != Some(count) {
                    return Err(TensorError::BytesElements {
                        name: self.name.clone(),
                        shape: self.shape.clone(),
                        expected: count,
                        actual: actual.unwrap_or(0),
                    });
                }
            }
        }
        Ok(())
    }

    /// Iterates over the elements of a BYTES tensor (empty for other datatypes).
    pub fn bytes_elements(&self) -> BytesElements<'_> {
        if self.datatype == DataType::Bytes {
            BytesElements::new(&self.data)
        } else {
            BytesElements::new(&[])
        }
    }
}

/// Appends one BYTES element (length prefix, then the bytes) to `out`.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) {
    // An element over 4 GiB cannot be expressed in the OIP layout; callers bound bodies far below that.
    let len = u32::try_from(element.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(element);
}

/// Iterator over length-prefixed BYTES elements; stops at the first truncated element.
#[derive(Debug, Clone)]
pub struct BytesElements<'a> {
    rest: &'a [u8],
    truncated: bool,
}

impl<'a> BytesElements<'a> {
    /// Iterates over `data` in OIP BYTES layout.
    pub fn new(data: &'a [u8]) -> Self {
        BytesElements {
            rest: data,
            truncated: false,
        }
    }

    /// Counts the elements, or `None` if the data does not end on an element boundary.
    pub fn try_count(mut self) -> Option<usize> {
        let mut n = 0;
        while self.next().is_some() {
            n += 1;
        }
        (!self.truncated).then_some(n)
    }
}

impl<'a> Iterator for BytesElements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = self.rest.split_first_chunk::<4>() else {
            self.truncated = true;
            self.rest = &[];
            return None;
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            self.truncated = true;
            self.rest = &[];
            return None;
        }
        let (element, rest) = tail.split_at(len);
        self.rest = rest;
        Some(element)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn fixed_size_tensor_checks_its_length() {
        let ok = Tensor::new("x", DataType::Fp32, vec![2, 3], Bytes::from(vec![0u8; 24]));
        assert!(ok.is_ok());
        let short = Tensor::new("x", DataType::Fp32, vec![2, 3], Bytes::from(vec![0u8; 20]));
        assert!(matches!(
            short,
            Err(TensorError::ByteLength {
                expected: 24,
                actual: 20,
                ..
            })
        ));
        let negative = Tensor::new("x", DataType::Fp32, vec![-1, 3], Bytes::new());
        assert!(matches!(negative, Err(TensorError::InvalidShape { .. })));
        let overflow = Tensor::new("x", DataType::Fp64, vec![i64::MAX, i64::MAX], Bytes::new());
        assert!(matches!(overflow, Err(TensorError::InvalidShape { .. })));
    }

    #[test]
    fn bytes_tensor_counts_length_prefixed_elements() {
        let mut data = Vec::new();
        push_bytes_element(&mut data, b"ab");
        push_bytes_element(&mut data, b"");
        push_bytes_element(&mut data, "βeta".as_bytes());
        let t = Tensor::new("s", DataType::Bytes, vec![3], Bytes::from(data.clone())).unwrap();
        let elements: Vec<&[u8]> = t.bytes_elements().collect();
        assert_eq!(elements, vec![&b"ab"[..], b"", "βeta".as_bytes()]);

        let wrong_count = Tensor::new("s", DataType::Bytes, vec![2], Bytes::from(data.clone()));
        assert!(matches!(
            wrong_count,
            Err(TensorError::BytesElements {
                expected: 2,
                actual: 3,
                ..
            })
        ));
        data.pop();
        let truncated = Tensor::new("s", DataType::Bytes, vec![3], Bytes::from(data));
        assert!(truncated.is_err());
    }
}
