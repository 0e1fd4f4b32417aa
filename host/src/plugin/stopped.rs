//! Why the host stopped a guest call, carried through wasmtime's error as it unwinds.

/// Why the host stopped a call: raised from host functions, the epoch callback and the memory
/// limiter, and recognised when the trap comes back.
#[derive(Debug)]
pub struct Stopped {
    /// A short label for metrics and for the failure's class.
    pub kind: &'static str,
    /// What happened, fit for the client.
    pub message: String,
}

impl Stopped {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Stopped {
        Stopped {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Stopped {}
