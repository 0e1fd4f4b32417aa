//! WASI randomness, counted per call.

use crate::plugin::stopped::Stopped;
use wasmtime_wasi::Rng;

/// WASI randomness, counted per call.
pub struct RandomBudget {
    cap: u64,
    used: u64,
    rng: Box<dyn Rng + Send>,
}

impl RandomBudget {
    pub(crate) fn new(cap: u64) -> RandomBudget {
        RandomBudget {
            cap,
            used: 0,
            rng: wasmtime_wasi::thread_rng(),
        }
    }

    /// A new call: nothing drawn yet.
    pub(crate) fn reset(&mut self) {
        self.used = 0;
    }

    fn draw(&mut self, bytes: u64) -> wasmtime::Result<()> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.cap {
            return Err(wasmtime::Error::new(Stopped::new(
                "limit",
                format!(
                    "drew more than {} bytes of randomness in one call",
                    self.cap
                ),
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.draw(len)?;
        let mut out = vec![0; usize::try_from(len)?];
        self.rng.fill_bytes(&mut out);
        Ok(out)
    }
}

impl wasmtime_wasi::p2::bindings::random::random::Host for RandomBudget {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.draw(8)?;
        Ok(self.rng.next_u64())
    }
}

impl wasmtime_wasi::p2::bindings::random::insecure::Host for RandomBudget {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.draw(8)?;
        Ok(self.rng.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randomness_is_counted_per_call_and_refused_past_the_cap() {
        let mut random = RandomBudget::new(64);
        assert_eq!(random.bytes(32).unwrap().len(), 32);
        assert!(random.bytes(32).is_ok());
        let err = random.bytes(1).unwrap_err();
        assert!(err.to_string().contains("more than 64 bytes"), "{err}");
        random.reset();
        assert!(random.bytes(64).is_ok());
    }
}
