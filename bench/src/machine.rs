//! What a virtual machine itself adds to latency figures, so figures from different machines
//! can be compared:
//!
//! - How idle CPUs wait. A halted vCPU is woken by the hypervisor, about 25 µs per wake-up on
//!   the development VM: two of them per request/response exchange at low load, most of a
//!   loopback round trip. Linux guests can poll before halting (the `haltpoll` cpuidle
//!   driver, up to `guest_halt_poll_ns`).
//! - What happens to freed memory. With free page reporting (virtio-balloon), blocks of
//!   2^order free pages go back to the host a few seconds after they are freed, and touching
//!   them again faults in the host: the first seconds of load after an idle pause (socket
//!   buffers, connection state, a fresh process's heap) run at a fraction of their speed.

use std::path::Path;

const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";
const GUEST_HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const BALLOON_DRIVER: &str = "/sys/bus/virtio/drivers/virtio_balloon";
/// The buddy allocator's largest block on the architectures we run on (`MAX_PAGE_ORDER`):
/// a reporting order above it reports nothing.
const MAX_PAGE_ORDER: u32 = 10;
const PAGE_KIB: u64 = 4;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new(path)).ok()
}

/// What this machine adds to latency figures, one labelled line per setting it reports.
pub fn summary() -> Vec<String> {
    [("idle CPUs", idle_cpus()), ("freed memory", freed_memory())]
        .into_iter()
        .filter_map(|(what, description)| Some(format!("{what}: {}", description?)))
        .collect()
}

/// How this machine's idle CPUs wait, in one line; `None` where the kernel does not say.
pub fn idle_cpus() -> Option<String> {
    describe_idle_cpus(
        read(CPUIDLE_DRIVER).as_deref(),
        read(GUEST_HALT_POLL_NS).as_deref(),
    )
}

/// Whether this machine hands freed memory back to its host, in one line; `None` where no
/// balloon device reports free pages.
pub fn freed_memory() -> Option<String> {
    let balloon_bound = std::fs::read_dir(BALLOON_DRIVER).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
    });
    describe_freed_memory(read(PAGE_REPORTING_ORDER).as_deref(), balloon_bound)
}

fn describe_freed_memory(order: Option<&str>, balloon_bound: bool) -> Option<String> {
    if !balloon_bound {
        return None;
    }
    let order = order?.trim().parse::<u32>().ok()?;
    Some(if order > MAX_PAGE_ORDER {
        format!("kept by the guest (page_reporting_order = {order}, above the largest block)")
    } else {
        format!(
            "returned to the host in blocks of {} KiB (free page reporting, page_reporting_order = {order}): load after an idle pause waits for the host to back it again",
            PAGE_KIB << order
        )
    })
}

fn describe_idle_cpus(driver: Option<&str>, halt_poll_ns: Option<&str>) -> Option<String> {
    let driver = driver.map(str::trim).filter(|d| !d.is_empty())?;
    if driver != "haltpoll" {
        return Some(format!("cpuidle driver {driver}"));
    }
    Some(
        match halt_poll_ns.and_then(|ns| ns.trim().parse::<u64>().ok()) {
            Some(0) => "virtual CPUs halt as soon as they are idle (haltpoll, guest_halt_poll_ns = 0): each wake-up of an idle CPU waits for the hypervisor, most of the latency at concurrency 1".to_string(),
            Some(ns) => format!(
                "virtual CPUs poll up to {} µs before halting (haltpoll, guest_halt_poll_ns = {ns})",
                ns / 1000
            ),
            None => "virtual CPUs use the haltpoll driver; its polling window is unknown".to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::{describe_freed_memory, describe_idle_cpus};

    #[test]
    fn a_guest_that_halts_at_once_is_named_as_the_cause_of_low_load_latency() {
        let halts = describe_idle_cpus(Some("haltpoll\n"), Some("0\n")).unwrap();
        assert!(
            halts.contains("halt as soon as they are idle") && halts.contains("= 0"),
            "{halts}"
        );
        let polls = describe_idle_cpus(Some("haltpoll\n"), Some("200000\n")).unwrap();
        assert!(polls.contains("poll up to 200 µs"), "{polls}");
        let unknown = describe_idle_cpus(Some("haltpoll"), None).unwrap();
        assert!(unknown.contains("unknown"), "{unknown}");
    }

    #[test]
    fn freed_memory_is_described_only_where_a_balloon_reports_it() {
        let returned = describe_freed_memory(Some("9\n"), true).unwrap();
        assert!(
            returned.contains("blocks of 2048 KiB") && returned.contains("idle pause"),
            "{returned}"
        );
        let kept = describe_freed_memory(Some("11\n"), true).unwrap();
        assert!(kept.starts_with("kept by the guest"), "{kept}");
        assert_eq!(describe_freed_memory(Some("9"), false), None);
        assert_eq!(describe_freed_memory(None, true), None);
    }

    #[test]
    fn other_machines_name_their_driver_or_nothing() {
        assert_eq!(
            describe_idle_cpus(Some("intel_idle\n"), None).as_deref(),
            Some("cpuidle driver intel_idle")
        );
        assert_eq!(describe_idle_cpus(None, Some("0")), None);
        assert_eq!(describe_idle_cpus(Some(" \n"), None), None);
    }
}
