//! Rust bindings of the plugin world (`guest-sdk/wit/plugin.wit`, the one copy of the WIT),
//! and conversions between its tensor type and the engine's.

use crate::tensor::{DataType, Tensor};
use bytes::Bytes;

/// The generated bindings of world `pre-post`, in their own module because the world's types
/// would clash with ours. Only the host's side is used: a stage's exports are called through
/// [`crate::plugin::outcome`]'s types, which bound what they lift, and a plugin needs only the
/// stage it serves, so a `pre` or `post` component loads too.
pub mod wit {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "pre-post",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "meshserve:plugin/types.request": crate::plugin::views::RequestView,
            "meshserve:plugin/types.context": crate::plugin::views::ContextView,
        },
    });
}

pub use wit::meshserve::plugin::host::{Host, LogLevel};
pub use wit::meshserve::plugin::types::{
    Datatype, Host as TypesHost, HostContext, HostRequest, PluginError as WitPluginError,
    Tensor as WitTensor,
};

/// The package every 0.2 plugin is built against, as it appears in export names.
pub const PACKAGE: &str = "meshserve:plugin@0.2.0";

impl From<DataType> for Datatype {
    fn from(d: DataType) -> Datatype {
        match d {
            DataType::Bool => Datatype::Bool,
            DataType::Uint8 => Datatype::Uint8,
            DataType::Uint16 => Datatype::Uint16,
            DataType::Uint32 => Datatype::Uint32,
            DataType::Uint64 => Datatype::Uint64,
            DataType::Int8 => Datatype::Int8,
            DataType::Int16 => Datatype::Int16,
            DataType::Int32 => Datatype::Int32,
            DataType::Int64 => Datatype::Int64,
            DataType::Fp16 => Datatype::Fp16,
            DataType::Fp32 => Datatype::Fp32,
            DataType::Fp64 => Datatype::Fp64,
            DataType::Bytes => Datatype::Bytes,
        }
    }
}

impl From<Datatype> for DataType {
    fn from(d: Datatype) -> DataType {
        match d {
            Datatype::Bool => DataType::Bool,
            Datatype::Uint8 => DataType::Uint8,
            Datatype::Uint16 => DataType::Uint16,
            Datatype::Uint32 => DataType::Uint32,
            Datatype::Uint64 => DataType::Uint64,
            Datatype::Int8 => DataType::Int8,
            Datatype::Int16 => DataType::Int16,
            Datatype::Int32 => DataType::Int32,
            Datatype::Int64 => DataType::Int64,
            Datatype::Fp16 => DataType::Fp16,
            Datatype::Fp32 => DataType::Fp32,
            Datatype::Fp64 => DataType::Fp64,
            Datatype::Bytes => DataType::Bytes,
        }
    }
}

impl From<&Tensor> for WitTensor {
    fn from(t: &Tensor) -> WitTensor {
        WitTensor {
            name: t.name.clone(),
            datatype: t.datatype.into(),
            shape: t.shape.clone(),
            data: t.data.to_vec(),
        }
    }
}

/// A plugin's tensor as an engine tensor, checked: a plugin is untrusted, so its byte counts are too.
pub fn tensor_from_plugin(t: WitTensor) -> Result<Tensor, crate::tensor::TensorError> {
    Tensor::new(t.name, t.datatype.into(), t.shape, Bytes::from(t.data))
}
