//! What the machine itself adds to latency figures: how its idle CPUs wait for work.
//!
//! On a virtual machine a halted vCPU is woken by the hypervisor, which on the development VM
//! costs about 25 µs per wake-up: two of them per request/response exchange at low load, most
//! of a loopback round trip. Linux guests can poll before halting (the `haltpoll` cpuidle
//! driver, up to `guest_halt_poll_ns`); with polling off, low-load latency is mostly the
//! hypervisor's. Benchmarks print this so figures from different machines can be compared.

use std::path::Path;

const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";
const GUEST_HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// How this machine's idle CPUs wait, in one line; `None` where the kernel does not say.
pub fn idle_cpus() -> Option<String> {
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).ok();
    describe_idle_cpus(
        read(CPUIDLE_DRIVER).as_deref(),
        read(GUEST_HALT_POLL_NS).as_deref(),
    )
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
    use super::describe_idle_cpus;

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
    fn other_machines_name_their_driver_or_nothing() {
        assert_eq!(
            describe_idle_cpus(Some("intel_idle\n"), None).as_deref(),
            Some("cpuidle driver intel_idle")
        );
        assert_eq!(describe_idle_cpus(None, Some("0")), None);
        assert_eq!(describe_idle_cpus(Some(" \n"), None), None);
    }
}
