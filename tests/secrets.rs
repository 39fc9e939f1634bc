//! Secrets never leak: with every log record captured at trace level, a
//! connection that logs in, updates its secret and fails a login never
//! writes a password or secret to the log, to `Debug` or `Display` of its
//! parameters, URL, credentials or connection, or to its errors.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{broker_params, rabbitmqctl, run_loop};
use pika::{ConnectionParameters, PlainCredentials, SelectConnection, UrlParameters};

static RECORDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        RECORDS
            .lock()
            .unwrap()
            .push(format!("{} {}", record.target(), record.args()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

const USER: &str = "secret-test-user";
const PASSWORD: &str = "Pa55-w0rd-NEVER-LOGGED";
const WRONG: &str = "Wr0ng-pa55-NEVER-LOGGED";

fn run(params: ConnectionParameters, update_secret: bool) -> Vec<String> {
    let texts = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let (t1, t2) = (texts.clone(), texts.clone());
    let conn = SelectConnection::new(
        params,
        move |conn| {
            if update_secret {
                conn.update_secret(PASSWORD, "rotation", |conn, r| {
                    r.expect("secret updated");
                    conn.close(200, "done").unwrap();
                })
                .unwrap();
            } else {
                conn.close(200, "done").unwrap();
            }
        },
        move |conn, e| {
            t1.borrow_mut().push(format!("{e} {e:?}"));
            conn.ioloop().stop();
        },
        move |conn, e| {
            t2.borrow_mut().push(format!("{e} {e:?}"));
            conn.ioloop().stop();
        },
    )
    .unwrap();
    texts.borrow_mut().push(format!("{conn:?}"));
    run_loop(conn.ioloop(), Duration::from_secs(30));
    texts
        .borrow_mut()
        .push(format!("{conn:?} {:?}", conn.params()));
    texts.borrow().clone()
}

#[test]
fn passwords_and_secrets_never_reach_logs_debug_display_or_errors() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    rabbitmqctl(&["add_user", USER, PASSWORD]);
    rabbitmqctl(&["set_permissions", USER, ".*", ".*", ".*"]);

    let mut good = broker_params();
    good.set_credentials(PlainCredentials::new(USER, PASSWORD));
    let mut seen = run(good.clone(), true);

    let mut bad = broker_params();
    bad.set_credentials(PlainCredentials::new(USER, WRONG));
    seen.extend(run(bad, false));

    let url = format!(
        "amqp://{USER}:{PASSWORD}@127.0.0.1:{}/%2F?heartbeat=5",
        good.port()
    );
    let parsed = UrlParameters::parse(&url).unwrap();
    seen.push(format!("{parsed} {parsed:?} {:?}", good.credentials()));
    let url_error = UrlParameters::parse(&format!("{url}&bogus=1")).unwrap_err();
    seen.push(format!("{url_error} {url_error:?}"));

    rabbitmqctl(&["delete_user", USER]);

    let records = RECORDS.lock().unwrap().clone();
    assert!(
        records.iter().any(|r| r.contains("connection")),
        "the capture works: {records:?}"
    );
    for text in records.iter().chain(&seen) {
        assert!(!text.contains(PASSWORD), "password leaked: {text}");
        assert!(!text.contains(WRONG), "wrong password leaked: {text}");
    }
    // And the failed login was reported as one.
    assert!(
        seen.iter()
            .any(|t| t.contains("ProbableAuthenticationError")),
        "{seen:?}"
    );
}
