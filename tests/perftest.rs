//! Smoke test of the `perftest` example: every workload runs to completion
//! against the broker with a tiny n, and reports figures whose RESULT line
//! reads back. No timing is asserted.

mod common;

#[path = "../examples/perftest/main.rs"]
mod perftest;

use perftest::{Report, run_workload};

/// Runs `name` with `n`, checks what every report must hold, and returns it.
fn smoke(name: &str, n: u64) -> Report {
    let report = run_workload(name, n, &common::amqp_url())
        .unwrap_or_else(|e| panic!("workload {name} with n={n} failed: {e}"));
    assert_eq!(report.workload, name);
    assert_eq!(report.n, n);
    assert!(report.wall_s > 0.0, "{report:?}");
    assert!(report.msgs_per_s > 0.0, "{report:?}");
    assert!(report.cpu_us_per_msg >= 0.0, "{report:?}");
    assert!(report.rss_mb > 0.0, "peak RSS read from /proc: {report:?}");
    let line = report.result_line();
    assert!(
        line.starts_with(&format!("RESULT workload={name} n={n} wall_s=")),
        "{line}"
    );
    assert!(
        report.proc_cpu_us_per_msg > 0.0,
        "the process used CPU: {report:?}"
    );
    for key in [
        " msgs_per_s=",
        " cpu_us_per_msg=",
        " proc_cpu_us_per_msg=",
        " rss_mb=",
    ] {
        assert!(line.contains(key), "{key} missing from {line}");
    }
    let parsed = Report::parse_result_line(&line).expect("the RESULT line parses");
    assert_eq!(parsed.workload, name);
    assert_eq!(parsed.n, n);
    assert!((parsed.proc_cpu_us_per_msg - report.proc_cpu_us_per_msg).abs() < 0.001);
    assert_eq!(parsed.p50_us.is_some(), report.p50_us.is_some());
    assert_eq!(parsed.mb_per_s.is_some(), report.mb_per_s.is_some());
    report
}

#[test]
fn p1_publishes_past_the_high_water_mark_and_the_broker_counts_every_message() {
    // ~1.4 MB of frames: more than the 1 MiB high-water mark, so the
    // publisher pauses and resumes from the drained callback.
    let report = smoke("P1", 10_000);
    assert!(report.p50_us.is_none() && report.mb_per_s.is_none());
}

#[test]
fn p2_publishes_with_confirms_through_more_than_one_window() {
    smoke("P2", 2_500);
}

#[test]
fn c1_consumes_and_acks_every_preloaded_message() {
    smoke("C1", 3_000);
}

#[test]
fn l1_reports_round_trip_percentiles() {
    let report = smoke("L1", 50);
    let (p50, p99) = (report.p50_us.unwrap(), report.p99_us.unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{report:?}");
    assert!(report.result_line().contains(" p50_us="));
    assert!(report.result_line().contains(" p99_us="));
}

#[test]
fn b1_moves_megabyte_messages_and_reports_throughput() {
    let report = smoke("B1", 3);
    assert!(report.mb_per_s.unwrap() > 0.0, "{report:?}");
    assert!(report.result_line().contains(" mb_per_s="));
}

#[test]
fn an_unknown_workload_or_zero_n_is_refused_before_connecting() {
    // Nothing listens on port 1: refusing must not need a broker.
    let url = "amqp://guest:guest@127.0.0.1:1/%2F";
    assert!(matches!(
        run_workload("X9", 10, url),
        Err(pika::Error::InvalidParameter {
            name: "workload",
            ..
        })
    ));
    assert!(matches!(
        run_workload("P1", 0, url),
        Err(pika::Error::InvalidParameter { name: "n", .. })
    ));
}

#[test]
fn tls_variants_run_the_same_workloads_over_amqps() {
    for name in ["P1T", "C1T"] {
        let report = smoke(name, 2_000);
        assert_eq!(report.workload, name);
        assert!(
            report
                .result_line()
                .starts_with(&format!("RESULT workload={name} "))
        );
    }
}

#[test]
fn the_blocking_workloads_run_to_completion() {
    let bp1 = smoke("BP1", 10_000);
    assert!(bp1.p50_us.is_none());
    smoke("BP2", 300);
    smoke("BP2W", 2_500);
    smoke("BC1", 3_000);
    let bl1 = smoke("BL1", 50);
    let (p50, p99) = (bl1.p50_us.unwrap(), bl1.p99_us.unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{bl1:?}");
}

#[test]
fn a_blocking_workload_over_tls_runs_too() {
    let report = smoke("BC1T", 2_000);
    assert_eq!(report.workload, "BC1T");
}
