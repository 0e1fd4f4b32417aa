//! What a stage's `handle` returns, in the node's own Rust form: the WIT's `pre-outcome`,
//! `post-outcome` and `reply`, with their lists of tensors and headers bounded in count
//! before anything is copied out of the guest.
//!
//! wasmtime's host-call fuel bounds the bytes an answer moves, but not how many pieces: 100,000
//! empty headers are a few megabytes, yet lifting them allocates 200,000 strings (about 10 ms of
//! host work) before the plugin's `reply_headers` limit could be checked, and wasmtime frees the
//! guest's copy as soon as it has lifted it, so it cannot be read in place first. [`Bounded`]
//! reads a list's length first and refuses one past its ceiling without copying an element; the
//! ceilings are the most a plugin's `limits` may set, and the plugin's own, lower limits are
//! checked on what was lifted ([`crate::plugin::limits`]).

use crate::plugin::bindings::{WitPluginError, WitTensor};
use crate::plugin::stopped::Stopped;
use crate::plugin::views::{ContextView, RequestView};
use std::ops::Deref;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift, Resource, TypedFunc, WasmList};

/// The most headers a reply may carry under any plugin's limits (`reply_headers`).
pub const MAX_REPLY_HEADERS: usize = 1024;

/// The most tensors a call may return under any plugin's limits (`output_tensors`).
pub const MAX_OUTPUT_TENSORS: usize = 1024;

/// A `list<T>` of at most `MAX` elements: a longer one fails the call when its length is read,
/// before any element is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> Bounded<T, MAX> {
    /// The elements.
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T, const MAX: usize> From<Vec<T>> for Bounded<T, MAX> {
    fn from(items: Vec<T>) -> Self {
        Bounded(items)
    }
}

impl<T, const MAX: usize> Deref for Bounded<T, MAX> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

// SAFETY: the canonical ABI form, its size and alignment, and the type check are those of
// `Vec<T>`, whose lifting this type performs; only the length check is added.
#[allow(unsafe_code)]
unsafe impl<T: ComponentType, const MAX: usize> ComponentType for Bounded<T, MAX> {
    type Lower = <Vec<T> as ComponentType>::Lower;

    const ABI: CanonicalAbiInfo = <Vec<T> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Vec<T> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: both lifts go through `WasmList`, which bounds-checks the list against the guest's
// memory and charges host-call fuel, then copy the elements as `Vec<T>` would.
#[allow(unsafe_code)]
unsafe impl<T: Lift + Piece, const MAX: usize> Lift for Bounded<T, MAX> {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<T>::linear_lift_from_flat(cx, ty, src)?;
        Self::copy(cx, &list)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<T>::linear_lift_from_memory(cx, ty, bytes)?;
        Self::copy(cx, &list)
    }
}

impl<T: Lift + Piece, const MAX: usize> Bounded<T, MAX> {
    fn copy(cx: &mut LiftContext<'_>, list: &WasmList<T>) -> wasmtime::Result<Self> {
        if list.len() > MAX {
            return Err(wasmtime::Error::new(Stopped::new(
                "limit",
                format!(
                    "returned {} {}; no plugin may return more than {MAX}",
                    list.len(),
                    T::PLURAL
                ),
            )));
        }
        T::linear_lift_list_from_memory(cx, list).map(Bounded)
    }
}

/// An element of a bounded list, named in its error.
pub trait Piece {
    /// The elements, plural.
    const PLURAL: &'static str;
}

impl Piece for WitTensor {
    const PLURAL: &'static str = "tensors";
}

impl Piece for (String, String) {
    const PLURAL: &'static str = "headers";
}

/// A reply a plugin built (WIT `reply`), before its limits are checked.
#[derive(Debug, Clone, ComponentType, Lift)]
#[component(record)]
pub struct Reply {
    /// 200 to 599.
    pub status: u16,
    /// Extra response headers.
    pub headers: Bounded<(String, String), MAX_REPLY_HEADERS>,
    /// The Content-Type.
    #[component(name = "content-type")]
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

/// Tensors a call returned, before their limits are checked.
pub type Tensors = Bounded<WitTensor, MAX_OUTPUT_TENSORS>;

/// What a pre stage decided (WIT `pre-outcome`).
#[derive(Debug, Clone, ComponentType, Lift)]
#[component(variant)]
pub enum PreOutcome {
    /// Run the model on these inputs.
    #[component(name = "infer")]
    Infer(Tensors),
    /// Answer without running the model.
    #[component(name = "reply")]
    Reply(Reply),
}

/// What a post stage decided (WIT `post-outcome`).
#[derive(Debug, Clone, ComponentType, Lift)]
#[component(variant)]
pub enum PostOutcome {
    /// Tensors for the front door to encode.
    #[component(name = "tensors")]
    Tensors(Tensors),
    /// A finished reply.
    #[component(name = "reply")]
    Reply(Reply),
}

/// A stage's `init`.
pub type InitFunc = TypedFunc<(String,), (Result<(), WitPluginError>,)>;

/// The pre stage's `handle`.
pub type PreHandle = TypedFunc<(Resource<RequestView>,), (Result<PreOutcome, WitPluginError>,)>;

/// The post stage's `handle`.
pub type PostHandle =
    TypedFunc<(Resource<ContextView>, Vec<WitTensor>), (Result<PostOutcome, WitPluginError>,)>;
