//! The memory budget for the models the mesh places on this node (`mesh.max_model_memory_bytes`).
//! A model placed here that would take the node past it is declined: the node's advert lists
//! it, placement passes this node over for it, and the next node in rendezvous order serves it.
//! A model counts as what loading it here added to the process (measured: the resident set
//! before and after, at least its files' size), or its files' size before it has loaded here.
//! A declined model is taken back once it fits (another model left), and placement returns it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// A model's decline, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Declined {
    /// What the model would take.
    pub needs: u64,
    /// What the models held here take.
    pub used: u64,
    /// The budget.
    pub budget: u64,
}

/// The budget, each model's measured size, and the models declined.
pub(super) struct ModelMemory {
    budget: Option<u64>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    measured: BTreeMap<String, u64>,
    declined: BTreeSet<String>,
}

impl State {
    fn size(&self, model: &str, files: u64) -> u64 {
        self.measured.get(model).copied().unwrap_or(files)
    }

    fn used(&self, held: &[(String, u64)]) -> u64 {
        held.iter()
            .map(|(model, files)| self.size(model, *files))
            .fold(0, u64::saturating_add)
    }
}

impl ModelMemory {
    pub(super) fn new(budget: Option<u64>) -> ModelMemory {
        ModelMemory {
            budget,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The models declined, sorted (for the advert).
    pub(super) fn declined(&self) -> Vec<String> {
        self.lock().declined.iter().cloned().collect()
    }

    /// Whether `model` (its files `files` bytes) may load beside the models `held` here
    /// (loaded or loading, each with its files' size); when it may not, it is declined, and
    /// the first time the reason is returned.
    pub(super) fn admit(
        &self,
        model: &str,
        files: u64,
        held: &[(String, u64)],
    ) -> Result<(), Option<Declined>> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let mut state = self.lock();
        let needs = state.size(model, files);
        let used = state.used(held);
        if used.saturating_add(needs) <= budget {
            return Ok(());
        }
        let first = state.declined.insert(model.to_string());
        Err(first.then_some(Declined {
            needs,
            used,
            budget,
        }))
    }

    /// Takes back the declined models that now fit beside `held` (in name order, each
    /// counted as held once taken), forgetting those `files_of` no longer knows (gone from
    /// the mesh); returns the ones taken back.
    pub(super) fn reconsider(
        &self,
        held: &[(String, u64)],
        files_of: impl Fn(&str) -> Option<u64>,
    ) -> Vec<String> {
        let Some(budget) = self.budget else {
            return Vec::new();
        };
        let mut state = self.lock();
        let mut used = state.used(held);
        let declined: Vec<String> = state.declined.iter().cloned().collect();
        let mut taken = Vec::new();
        for model in declined {
            let Some(files) = files_of(&model) else {
                state.declined.remove(&model);
                continue;
            };
            let needs = state.size(&model, files);
            if used.saturating_add(needs) <= budget {
                used = used.saturating_add(needs);
                state.declined.remove(&model);
                taken.push(model);
            }
        }
        taken
    }

    /// Records what loading `model` added to the process (`grew`), at least its files.
    pub(super) fn loaded(&self, model: &str, files: u64, grew: u64) {
        self.lock()
            .measured
            .insert(model.to_string(), grew.max(files));
    }
}

/// This process's resident memory, in bytes (Linux; `None` elsewhere).
pub(super) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(models: &[(&str, u64)]) -> Vec<(String, u64)> {
        models.iter().map(|(m, b)| (m.to_string(), *b)).collect()
    }

    #[test]
    fn a_model_past_the_budget_is_declined_once_and_taken_back_when_it_fits() {
        let memory = ModelMemory::new(Some(100));
        assert_eq!(memory.admit("fraud", 30, &held(&[("echo", 20)])), Ok(()));
        // Measured at load: heavy took 70, more than its 40 bytes of files.
        memory.loaded("heavy", 40, 70);
        let declined = memory.admit("heavy", 40, &held(&[("fraud", 30), ("echo", 20)]));
        assert_eq!(
            declined,
            Err(Some(Declined {
                needs: 70,
                used: 50,
                budget: 100
            }))
        );
        assert_eq!(
            memory.admit("heavy", 40, &held(&[("fraud", 30), ("echo", 20)])),
            Err(None),
            "reported once"
        );
        assert_eq!(memory.declined(), ["heavy"]);
        let files = |m: &str| (m == "heavy").then_some(40);
        assert!(
            memory
                .reconsider(&held(&[("fraud", 30), ("echo", 20)]), files)
                .is_empty()
        );
        assert_eq!(memory.reconsider(&held(&[("fraud", 30)]), files), ["heavy"]);
        assert!(memory.declined().is_empty());
        // Gone from the mesh: forgotten.
        let _ = memory.admit("old", 500, &[]);
        assert!(memory.reconsider(&[], |_| None).is_empty());
        assert!(memory.declined().is_empty());
    }

    #[test]
    fn without_a_budget_everything_fits() {
        let memory = ModelMemory::new(None);
        assert_eq!(
            memory.admit("huge", u64::MAX, &held(&[("x", u64::MAX)])),
            Ok(())
        );
        assert!(memory.declined().is_empty());
    }

    #[test]
    fn this_process_has_a_resident_set() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
