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

/// Issue 21: a member with a valid node certificate gossiped "b is down" on every tick and
/// made the mesh drop b 90 times. A report about another member now counts as suspicion only,
/// which b refutes by answering, so b stays a member everywhere and never has to rejoin.
#[test]
fn a_member_reporting_another_down_every_tick_removes_no_one() {
    use meshserve::membership::sim::{Simulation, node_name};
    let mut sim = Simulation::new(DetectorConfig::default(), 21);
    for i in 0..4 {
        sim.start(i, (i > 0).then_some(0));
    }
    let converged = sim.run_until_true(Duration::from_millis(100), Duration::from_secs(30), |s| {
        s.converged()
    });
    assert!(converged.is_some(), "the mesh converged");
    let (victim, liar) = (1, 3);
    let generation = sim.generation(victim);
    // 20 s of lies, ten a second, to every other member.
    for _ in 0..200 {
        // The victim itself is told too: being reported down must not make it rejoin.
        for to in [0, 1, 2] {
            sim.report_down(liar, to, victim);
        }
        let next = sim.now() + Duration::from_millis(100);
        sim.run_until(next);
        for observer in [0, 2, 3] {
            assert!(
                sim.view(observer)
                    .iter()
                    .any(|m| m.id.name == node_name(victim)),
                "node {observer} dropped the victim at {:?}",
                sim.now()
            );
        }
    }
    assert_eq!(
        sim.generation(victim),
        generation,
        "the victim never rejoined"
    );

    // A member that really stops is still declared down, by each node's own suspicion.
    sim.crash(2);
    let dropped = sim.run_until_true(Duration::from_millis(100), Duration::from_secs(15), |s| {
        s.everyone_dropped(2)
    });
    assert!(dropped.is_some(), "a crashed member is still detected");
}

/// Issue 27: the load-following replica policy on 100 nodes and 1,000 models, on virtual
/// time: no oscillation, every node decides a step's count within 3 s and within a second of
/// each other, steady models never change, and a dead node's models are placed elsewhere as
/// soon as the mesh drops it.
#[test]
fn the_replica_policy_on_a_hundred_nodes_converges_without_oscillating() {
    use meshserve::placement::sim;
    let detection = Duration::from_secs(6);
    let started = std::time::Instant::now();
    let report = sim::run(100, 1000, detection, 7);
    eprintln!("{report}(in {:?} of real time)", started.elapsed());
    assert_eq!(report.oscillations, 0, "{report}");
    assert_eq!(report.steady_changes, 0, "{report}");
    assert!(report.step_spread <= Duration::from_secs(1), "{report}");
    assert!(
        report
            .step_all_decided
            .is_some_and(|d| d <= Duration::from_secs(3)),
        "{report}"
    );
    assert!(
        report
            .step_back_all
            .is_some_and(|d| d <= Duration::from_secs(30 + 5)),
        "{report}"
    );
    assert!(
        report
            .loss_replaced
            .is_some_and(|d| d <= detection + Duration::from_secs(1)),
        "{report}"
    );
    assert!(report.loss_served.is_some(), "{report}");
}
