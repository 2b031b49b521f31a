//! Session lifetime: a session ends `session_idle` after its last use (not after sign-in) and
//! `session_absolute` after sign-in however active it is; the cookie's Max-Age moves with the
//! idle timeout.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::{Duration, Instant};

use common::{Browser, TestPortal};
use gatehouse_portal::SESSION_COOKIE;

const IDLE: Duration = Duration::from_secs(3);
const BETWEEN_REQUESTS: Duration = Duration::from_millis(400);

async fn portal(absolute: Duration) -> TestPortal {
    common::start_with(None, |settings| {
        settings.session_idle = IDLE;
        settings.session_absolute = absolute;
    })
    .await
}

/// Whether the browser is signed in, as the portal's own pages ask; and whether the response
/// set the session cookie again with a Max-Age.
async fn signed_in(browser: &mut Browser, portal: &TestPortal) -> (bool, bool) {
    let response = browser
        .post(&format!("{}/api/portal_info", portal.url), &[])
        .await;
    let cookie_renewed = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|value| {
            let value = value.to_str().unwrap();
            value.starts_with(&format!("{SESSION_COOKIE}=")) && value.contains("Max-Age=")
        });
    let info: serde_json::Value = response.json().await.unwrap();
    (!info["user"].is_null(), cookie_renewed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_in_use_outlives_the_idle_timeout_and_ends_once_unused_that_long() {
    let portal = portal(Duration::from_secs(3600)).await;
    let mut browser = Browser::new(&portal);
    browser.dev_sign_in(&portal, "Viewer").await;
    let signed_in_at = Instant::now();
    let mut renewed_after_idle = false;
    while signed_in_at.elapsed() < IDLE * 2 {
        let (signed_in, renewed) = signed_in(&mut browser, &portal).await;
        assert!(
            signed_in,
            "signed out {:?} after sign-in although in use every {BETWEEN_REQUESTS:?}",
            signed_in_at.elapsed()
        );
        renewed_after_idle |= renewed && signed_in_at.elapsed() > IDLE;
        tokio::time::sleep(BETWEEN_REQUESTS).await;
    }
    assert!(
        renewed_after_idle,
        "the cookie's Max-Age is renewed too, or a browser drops it {IDLE:?} after sign-in"
    );
    // Unused for longer than the idle timeout: the session has ended.
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    let (signed_in, _) = signed_in(&mut browser, &portal).await;
    assert!(!signed_in, "signed in after {IDLE:?} without use");
    let page = browser
        .post(&format!("{}/api/list_activity", portal.url), &[])
        .await;
    assert_eq!(page.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_in_use_still_ends_at_its_absolute_lifetime() {
    let absolute = Duration::from_secs(5);
    let portal = portal(absolute).await;
    let mut browser = Browser::new(&portal);
    browser.dev_sign_in(&portal, "Viewer").await;
    let signed_in_at = Instant::now();
    let mut ended_after = None;
    while signed_in_at.elapsed() < absolute + Duration::from_secs(2) {
        let (signed_in, _) = signed_in(&mut browser, &portal).await;
        let elapsed = signed_in_at.elapsed();
        match (signed_in, ended_after) {
            (true, None) => {}
            (false, None) => ended_after = Some(elapsed),
            (true, Some(ended)) => {
                panic!("signed in again at {elapsed:?}, after it ended at {ended:?}")
            }
            (false, Some(_)) => {}
        }
        tokio::time::sleep(BETWEEN_REQUESTS).await;
    }
    let ended_after = ended_after.expect("the session ends at its absolute lifetime");
    // The sign-in happened just before `signed_in_at`; the end is near `absolute` after it, well
    // past the idle timeout.
    assert!(
        ended_after > absolute - Duration::from_millis(500),
        "ended at {ended_after:?}, before the absolute lifetime of {absolute:?}"
    );
}
