//! Tensors with typed data, so a plugin reads `&[f32]` or `&[i64]` instead of bytes.

use crate::wit::{Datatype, Tensor as WitTensor};

/// A tensor's elements, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// BOOL.
    Bool(Vec<bool>),
    /// UINT8.
    U8(Vec<u8>),
    /// UINT16.
    U16(Vec<u16>),
    /// UINT32.
    U32(Vec<u32>),
    /// UINT64.
    U64(Vec<u64>),
    /// INT8.
    I8(Vec<i8>),
    /// INT16.
    I16(Vec<i16>),
    /// INT32.
    I32(Vec<i32>),
    /// INT64.
    I64(Vec<i64>),
    /// FP16, as raw bits.
    F16(Vec<u16>),
    /// FP32.
    F32(Vec<f32>),
    /// FP64.
    F64(Vec<f64>),
    /// BYTES: one byte string per element.
    Bytes(Vec<Vec<u8>>),
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The model input or output name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<i64>,
    /// The elements.
    pub data: TensorData,
}

macro_rules! constructor_and_view {
    ($(($ctor:ident, $view:ident, $variant:ident, $t:ty)),* $(,)?) => {
        impl Tensor {
            $(
                #[doc = concat!("A `", stringify!($t), "` tensor.")]
                pub fn $ctor(name: impl Into<String>, shape: Vec<i64>, data: Vec<$t>) -> Tensor {
                    Tensor { name: name.into(), shape, data: TensorData::$variant(data) }
                }

                #[doc = concat!("The elements as `&[", stringify!($t), "]`, if that is the datatype.")]
                pub fn $view(&self) -> Option<&[$t]> {
                    match &self.data {
                        TensorData::$variant(v) => Some(v),
                        _ => None,
                    }
                }
            )*
        }
    };
}

constructor_and_view!(
    (bool, as_bool, Bool, bool),
    (uint8, as_u8, U8, u8),
    (uint16, as_u16, U16, u16),
    (uint32, as_u32, U32, u32),
    (uint64, as_u64, U64, u64),
    (int8, as_i8, I8, i8),
    (int16, as_i16, I16, i16),
    (int32, as_i32, I32, i32),
    (int64, as_i64, I64, i64),
    (fp32, as_f32, F32, f32),
    (fp64, as_f64, F64, f64),
);

impl Tensor {
    /// A BYTES tensor.
    pub fn bytes(name: impl Into<String>, shape: Vec<i64>, data: Vec<Vec<u8>>) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data: TensorData::Bytes(data),
        }
    }

    /// The elements of a BYTES tensor.
    pub fn as_bytes(&self) -> Option<&[Vec<u8>]> {
        match &self.data {
            TensorData::Bytes(v) => Some(v),
            _ => None,
        }
    }

    /// The element count the shape describes.
    pub fn element_count(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product()
    }

    pub(crate) fn into_wit(self) -> WitTensor {
        fn le<T, const N: usize>(values: Vec<T>, to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            values.into_iter().flat_map(to).collect()
        }
        let (datatype, data) = match self.data {
            TensorData::Bool(v) => (Datatype::Bool, v.into_iter().map(u8::from).collect()),
            TensorData::U8(v) => (Datatype::Uint8, v),
            TensorData::U16(v) => (Datatype::Uint16, le(v, u16::to_le_bytes)),
            TensorData::U32(v) => (Datatype::Uint32, le(v, u32::to_le_bytes)),
            TensorData::U64(v) => (Datatype::Uint64, le(v, u64::to_le_bytes)),
            TensorData::I8(v) => (Datatype::Int8, le(v, i8::to_le_bytes)),
            TensorData::I16(v) => (Datatype::Int16, le(v, i16::to_le_bytes)),
            TensorData::I32(v) => (Datatype::Int32, le(v, i32::to_le_bytes)),
            TensorData::I64(v) => (Datatype::Int64, le(v, i64::to_le_bytes)),
            TensorData::F16(v) => (Datatype::Fp16, le(v, u16::to_le_bytes)),
            TensorData::F32(v) => (Datatype::Fp32, le(v, f32::to_le_bytes)),
            TensorData::F64(v) => (Datatype::Fp64, le(v, f64::to_le_bytes)),
            TensorData::Bytes(v) => {
                let mut out = Vec::new();
                for element in v {
                    out.extend_from_slice(&(element.len() as u32).to_le_bytes());
                    out.extend_from_slice(&element);
                }
                (Datatype::Bytes, out)
            }
        };
        WitTensor {
            name: self.name,
            datatype,
            shape: self.shape,
            data,
        }
    }

    /// The host sends only tensors it validated, so this cannot meet a malformed one.
    pub(crate) fn from_wit(tensor: WitTensor) -> Tensor {
        fn chunks<T, const N: usize>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut raw = [0u8; N];
                    raw.copy_from_slice(c);
                    from(raw)
                })
                .collect()
        }
        let bytes = &tensor.data;
        let data = match tensor.datatype {
            Datatype::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
            Datatype::Uint8 => TensorData::U8(bytes.clone()),
            Datatype::Uint16 => TensorData::U16(chunks(bytes, u16::from_le_bytes)),
            Datatype::Uint32 => TensorData::U32(chunks(bytes, u32::from_le_bytes)),
            Datatype::Uint64 => TensorData::U64(chunks(bytes, u64::from_le_bytes)),
            Datatype::Int8 => TensorData::I8(chunks(bytes, i8::from_le_bytes)),
            Datatype::Int16 => TensorData::I16(chunks(bytes, i16::from_le_bytes)),
            Datatype::Int32 => TensorData::I32(chunks(bytes, i32::from_le_bytes)),
            Datatype::Int64 => TensorData::I64(chunks(bytes, i64::from_le_bytes)),
            Datatype::Fp16 => TensorData::F16(chunks(bytes, u16::from_le_bytes)),
            Datatype::Fp32 => TensorData::F32(chunks(bytes, f32::from_le_bytes)),
            Datatype::Fp64 => TensorData::F64(chunks(bytes, f64::from_le_bytes)),
            Datatype::Bytes => {
                let mut elements = Vec::new();
                let mut rest = bytes.as_slice();
                while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                    let len = u32::from_le_bytes(*len) as usize;
                    if tail.len() < len {
                        break;
                    }
                    elements.push(tail[..len].to_vec());
                    rest = &tail[len..];
                }
                TensorData::Bytes(elements)
            }
        };
        Tensor {
            name: tensor.name,
            shape: tensor.shape,
            data,
        }
    }
}
