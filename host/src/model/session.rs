//! One ONNX Runtime session and the conversion between [`Tensor`]s and ONNX Runtime values.
//!
//! `Session::run` takes `&mut self`, so a session belongs to one worker thread at a time;
//! the batcher owns several when a model has several instances.

use crate::model::config::{ExecutionProvider, ModelConfig};
use crate::model::signature::{Signature, TensorSpec};
use crate::runtime::Runtime;
use crate::tensor::{DataType, Tensor, push_bytes_element};
use bytes::Bytes;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use std::path::Path;

/// Why a model file could not become a session.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime rejected the file or the options.
    #[error("ONNX Runtime could not load {path}: {message}")]
    Runtime {
        /// The model file.
        path: String,
        /// ONNX Runtime's message.
        message: String,
    },
    /// A requested execution provider is missing and the config forbids falling back.
    #[error(
        "execution provider '{provider}' is not available for {path}: {reason}. Install the onnxruntime-gpu wheel on a machine with a GPU, \
         or set `fallback_to_cpu = true` in the model's config.toml"
    )]
    ProviderUnavailable {
        /// The model file.
        path: String,
        /// The provider asked for.
        provider: &'static str,
        /// What was missing.
        reason: String,
    },
    /// The graph uses a tensor type meshserve cannot carry.
    #[error("{path}: {what} '{name}' has type {ty}, which meshserve does not serve")]
    UnsupportedType {
        /// The model file.
        path: String,
        /// "input" or "output".
        what: &'static str,
        /// The tensor's name.
        name: String,
        /// The ONNX type.
        ty: String,
    },
}

/// A failure while running a loaded session.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Input data ONNX Runtime cannot take (e.g. BYTES that are not UTF-8).
    #[error("{0}")]
    BadInput(String),
    /// ONNX Runtime failed during the run.
    #[error("ONNX Runtime failed: {0}")]
    Runtime(String),
}

fn runtime_error(e: impl std::fmt::Display) -> RunError {
    RunError::Runtime(e.to_string())
}

/// A loaded ONNX model, ready to run.
pub struct OnnxSession {
    session: Session,
    signature: Signature,
}

impl OnnxSession {
    /// Loads `path` with the threads and execution providers from `config`.
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        config: &ModelConfig,
    ) -> Result<OnnxSession, LoadError> {
        let shown = path.display().to_string();
        let runtime_err = |e: &dyn std::fmt::Display| LoadError::Runtime {
            path: shown.clone(),
            message: e.to_string(),
        };
        let providers = usable_providers(&shown, config)?;
        let builder = Session::builder(&runtime.environment)
            .map_err(|e| runtime_err(&e))?
            .with_intra_threads(config.resolved_intra_op_threads())
            .map_err(|e| runtime_err(&e))?
            .with_inter_threads(1)
            .map_err(|e| runtime_err(&e))?
            // The cores are shared with the front door and the other sessions: an idle
            // session must sleep, not spin.
            .with_intra_op_spinning(false)
            .map_err(|e| runtime_err(&e))?
            .with_inter_op_spinning(false)
            .map_err(|e| runtime_err(&e))?;
        let mut builder = if providers.is_empty() {
            builder
        } else {
            builder
                .with_execution_providers(providers)
                .map_err(|e| runtime_err(&e))?
        };
        let session = builder.commit_from_file(path).map_err(|e| {
            if config.execution_providers.contains(&ExecutionProvider::Cpu)
                || config.fallback_to_cpu
            {
                runtime_err(&e)
            } else {
                LoadError::ProviderUnavailable {
                    path: shown.clone(),
                    provider: config.execution_providers[0].as_str(),
                    reason: e.to_string(),
                }
            }
        })?;
        let signature = Signature {
            inputs: session
                .inputs()
                .iter()
                .map(|o| spec_of(&shown, "input", o.name(), o.dtype()))
                .collect::<Result<_, _>>()?,
            outputs: session
                .outputs()
                .iter()
                .map(|o| spec_of(&shown, "output", o.name(), o.dtype()))
                .collect::<Result<_, _>>()?,
        };
        Ok(OnnxSession { session, signature })
    }

    /// The model's inputs and outputs.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs the model. `inputs` must be in signature order and already validated against it;
    /// the outputs come back in signature order.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (spec, tensor) in self.signature.inputs.iter().zip(inputs) {
            values.push((spec.name.as_str(), input_value(tensor)?));
        }
        let outputs = self.session.run(values).map_err(runtime_error)?;
        self.signature
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| {
                    RunError::Runtime(format!("output '{}' missing from the run", spec.name))
                })?;
                from_value(&spec.name, spec.datatype, value)
            })
            .collect()
    }
}

/// The providers to register, checked against what this ONNX Runtime build offers.
fn usable_providers(
    path: &str,
    config: &ModelConfig,
) -> Result<Vec<ep::ExecutionProviderDispatch>, LoadError> {
    let mut dispatch = Vec::new();
    for provider in &config.execution_providers {
        let available = match provider {
            ExecutionProvider::Cpu => continue,
            ExecutionProvider::Cuda => ep::CUDA::is_available(),
            ExecutionProvider::Tensorrt => ep::TensorRT::is_available(),
        };
        match available {
            Ok(true) => {
                let built = match provider {
                    ExecutionProvider::Cuda => ep::CUDA::default().build(),
                    _ => ep::TensorRT::default().build(),
                };
                // Without fallback, a provider that fails to start (no GPU) must fail the load.
                dispatch.push(if config.fallback_to_cpu {
                    built
                } else {
                    built.error_on_failure()
                });
            }
            outcome => {
                let reason = match outcome {
                    Err(e) => e.to_string(),
                    _ => "this ONNX Runtime build does not include it".to_string(),
                };
                if config.fallback_to_cpu {
                    tracing::warn!(path, provider = provider.as_str(), %reason, "execution provider unavailable, falling back to CPU");
                } else {
                    return Err(LoadError::ProviderUnavailable {
                        path: path.to_string(),
                        provider: provider.as_str(),
                        reason,
                    });
                }
            }
        }
    }
    Ok(dispatch)
}

fn spec_of(
    path: &str,
    what: &'static str,
    name: &str,
    ty: &ValueType,
) -> Result<TensorSpec, LoadError> {
    let unsupported = || LoadError::UnsupportedType {
        path: path.to_string(),
        what,
        name: name.to_string(),
        ty: ty.to_string(),
    };
    let ValueType::Tensor {
        ty: element, shape, ..
    } = ty
    else {
        return Err(unsupported());
    };
    let datatype = datatype_of(*element).ok_or_else(unsupported)?;
    Ok(TensorSpec {
        name: name.to_string(),
        datatype,
        shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
    })
}

fn datatype_of(element: TensorElementType) -> Option<DataType> {
    Some(match element {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// A fixed-size element that converts to and from the OIP little-endian layout.
trait Element: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static {
    const SIZE: usize;
    /// `bytes` (OIP's little-endian layout) as elements without a copy, when this machine's
    /// layout is the same and they are aligned for the type.
    fn view(bytes: &[u8]) -> Option<&[Self]>;
    fn read(bytes: &[u8]) -> Self;
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! numeric_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn view(bytes: &[u8]) -> Option<&[Self]> {
                if cfg!(target_endian = "little") {
                    bytemuck::try_cast_slice(bytes).ok()
                } else {
                    None
                }
            }
            fn read(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_le_bytes(raw)
            }
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
numeric_element!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);

impl Element for bool {
    const SIZE: usize = 1;
    // Not every byte is a valid `bool`: each is checked as it is read.
    fn view(_: &[u8]) -> Option<&[Self]> {
        None
    }
    fn read(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
    fn write(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

fn typed_input<T: Element>(tensor: &Tensor) -> Result<SessionInputValue<'_>, RunError> {
    if let Some(elements) = T::view(&tensor.data) {
        return TensorRef::from_array_view((tensor.shape.as_slice(), elements))
            .map(SessionInputValue::from)
            .map_err(runtime_error);
    }
    let elements: Vec<T> = tensor.data.chunks_exact(T::SIZE).map(T::read).collect();
    ort::value::Tensor::from_array((tensor.shape.clone(), elements))
        .map(SessionInputValue::from)
        .map_err(runtime_error)
}

/// An input as ONNX Runtime takes it: a view over the request's own bytes where their layout
/// already is the element type's, else a converted copy.
fn input_value(tensor: &Tensor) -> Result<SessionInputValue<'_>, RunError> {
    match tensor.datatype {
        DataType::Bool => typed_input::<bool>(tensor),
        DataType::Uint8 => typed_input::<u8>(tensor),
        DataType::Uint16 => typed_input::<u16>(tensor),
        DataType::Uint32 => typed_input::<u32>(tensor),
        DataType::Uint64 => typed_input::<u64>(tensor),
        DataType::Int8 => typed_input::<i8>(tensor),
        DataType::Int16 => typed_input::<i16>(tensor),
        DataType::Int32 => typed_input::<i32>(tensor),
        DataType::Int64 => typed_input::<i64>(tensor),
        DataType::Fp32 => typed_input::<f32>(tensor),
        DataType::Fp64 => typed_input::<f64>(tensor),
        DataType::Bytes => {
            let strings = tensor
                .bytes_elements()
                .map(|e| {
                    String::from_utf8(e.to_vec()).map_err(|_| {
                        RunError::BadInput(format!(
                            "input '{}': BYTES element is not valid UTF-8, which ONNX string tensors require",
                            tensor.name
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            ort::value::Tensor::from_string_array((tensor.shape.clone(), strings.as_slice()))
                .map(SessionInputValue::from)
                .map_err(runtime_error)
        }
        DataType::Fp16 => Err(RunError::BadInput(format!(
            "input '{}': FP16 is not supported",
            tensor.name
        ))),
    }
}

fn typed_tensor<T: Element>(
    name: &str,
    datatype: DataType,
    value: &DynValue,
) -> Result<Tensor, RunError> {
    let (shape, elements) = value.try_extract_tensor::<T>().map_err(runtime_error)?;
    let mut data = Vec::with_capacity(elements.len() * T::SIZE);
    for &e in elements {
        e.write(&mut data);
    }
    Ok(Tensor {
        name: name.to_string(),
        datatype,
        shape: shape.to_vec(),
        data: Bytes::from(data),
    })
}

fn from_value(name: &str, datatype: DataType, value: &DynValue) -> Result<Tensor, RunError> {
    match datatype {
        DataType::Bool => typed_tensor::<bool>(name, datatype, value),
        DataType::Uint8 => typed_tensor::<u8>(name, datatype, value),
        DataType::Uint16 => typed_tensor::<u16>(name, datatype, value),
        DataType::Uint32 => typed_tensor::<u32>(name, datatype, value),
        DataType::Uint64 => typed_tensor::<u64>(name, datatype, value),
        DataType::Int8 => typed_tensor::<i8>(name, datatype, value),
        DataType::Int16 => typed_tensor::<i16>(name, datatype, value),
        DataType::Int32 => typed_tensor::<i32>(name, datatype, value),
        DataType::Int64 => typed_tensor::<i64>(name, datatype, value),
        DataType::Fp32 => typed_tensor::<f32>(name, datatype, value),
        DataType::Fp64 => typed_tensor::<f64>(name, datatype, value),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(runtime_error)?;
            let mut data = Vec::new();
            for s in &strings {
                push_bytes_element(&mut data, s.as_bytes());
            }
            Ok(Tensor {
                name: name.to_string(),
                datatype,
                shape: shape.to_vec(),
                data: Bytes::from(data),
            })
        }
        DataType::Fp16 => Err(RunError::Runtime(format!(
            "output '{name}': FP16 is not supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_input_bytes_are_viewed_in_place_and_misaligned_ones_are_read_by_copy() {
        let values = [1.5f32, -2.0, 3.25];
        let aligned: &[u8] = bytemuck::cast_slice(&values);
        let viewed = f32::view(aligned).expect("aligned little-endian bytes are viewed");
        assert_eq!(viewed, values);
        assert_eq!(viewed.as_ptr().cast::<u8>(), aligned.as_ptr(), "no copy");

        // The same bytes one or two bytes past an aligned address (as a binary tensor can sit
        // inside a request body).
        let mut buffer = vec![0u8; aligned.len() + 2];
        let offset = if (buffer.as_ptr() as usize + 1).is_multiple_of(4) {
            2
        } else {
            1
        };
        buffer[offset..offset + aligned.len()].copy_from_slice(aligned);
        let misaligned = &buffer[offset..offset + aligned.len()];
        assert!(f32::view(misaligned).is_none());
        let read: Vec<f32> = misaligned.chunks_exact(4).map(f32::read).collect();
        assert_eq!(read, values);

        assert!(
            bool::view(&[0, 1]).is_none(),
            "bool bytes are checked, never viewed"
        );
    }
}
