//! Membership and placement of 100+ nodes on virtual time: how fast a mesh converges after
//! joins, how fast a crash is detected everywhere, how fast a restarted node is back, and how
//! little placement moves when one node joins. Deterministic: same seed, same numbers.

use meshserve::membership::DetectorConfig;
use meshserve::membership::sim::run_scenario;
use std::time::Duration;

#[test]
fn a_hundred_nodes_converge_detect_a_crash_and_move_little_on_a_join() {
    let report = run_scenario(100, DetectorConfig::default(), 1);
    eprintln!("{report}");
    let within =
        |d: Option<Duration>, limit: u64| d.is_some_and(|d| d < Duration::from_secs(limit));
    assert!(within(report.join_convergence, 15), "{report}");
    assert!(within(report.crash_first_detected, 5), "{report}");
    assert!(within(report.crash_detected_everywhere, 10), "{report}");
    assert!(within(report.rejoin_convergence, 10), "{report}");
    let ratio = report.moved_on_join / report.ideal_moved_on_join;
    assert!((0.6..1.5).contains(&ratio), "{report}");
}

#[test]
fn the_simulation_is_deterministic() {
    let detector = DetectorConfig::default();
    let a = run_scenario(20, detector, 9);
    let b = run_scenario(20, detector, 9);
    assert_eq!(a.join_convergence, b.join_convergence);
    assert_eq!(a.crash_detected_everywhere, b.crash_detected_everywhere);
    assert_eq!(a.rejoin_convergence, b.rejoin_convergence);
}
