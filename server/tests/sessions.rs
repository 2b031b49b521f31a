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

/// A gateway double that accepts connections and answers none of them until `release` turns
/// true, then drops them: a push to it is as slow as the test wants. `accepted` gets a message
/// per connection.
async fn stalling_gateway(
    release: tokio::sync::watch::Receiver<bool>,
    accepted: tokio::sync::mpsc::UnboundedSender<()>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = accepted.send(());
            let mut release = release.clone();
            tokio::spawn(async move {
                let _ = release.wait_for(|released| *released).await;
                drop(stream);
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_at_sign_out_does_not_bring_the_session_back() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel();
    let gateway = stalling_gateway(release_rx, accepted_tx).await;
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("gw-token");
    std::fs::write(&token_file, "stalling-gateway-admin-token").unwrap();
    let token_ref = format!("file:{}", token_file.display());
    let portal = common::start_with(None, |settings| {
        settings.session_idle = IDLE;
        settings.gateways = vec![("gw-slow".to_owned(), gateway.clone(), token_ref.clone())];
    })
    .await;
    let mut browser = Browser::new(&portal);
    browser.dev_sign_in(&portal, "Admin").await;
    let cookie = browser.cookie.clone();
    // Past a quarter of the idle timeout, the next request saves the session again (modifies
    // it) to move its expiry.
    tokio::time::sleep(IDLE / 4 + Duration::from_millis(200)).await;

    // A slow request: it loads and modifies the session, then waits for the gateway it publishes
    // the new subscription to.
    let mut slow = Browser::new(&portal);
    slow.cookie = cookie.clone();
    let url = portal.url.clone();
    let in_flight = tokio::spawn(async move {
        slow.post(
            &format!("{url}/api/create_subscription"),
            &[
                ("id", "team-slow"),
                ("display_name", "Team slow"),
                ("product", ""),
                ("expires_on", ""),
            ],
        )
        .await
        .status()
    });
    // The request is past its session check once it pushes to the gateway.
    tokio::time::timeout(Duration::from_secs(10), accepted_rx.recv())
        .await
        .expect("the slow request reaches the gateway")
        .unwrap();

    // Sign out while it runs.
    let mut signing_out = Browser::new(&portal);
    signing_out.cookie = cookie.clone();
    let response = signing_out
        .post(&format!("{}/auth/sign-out", portal.url), &[])
        .await;
    assert_eq!(response.status(), 303);
    let mut stolen = Browser::new(&portal);
    stolen.cookie = cookie.clone();
    assert!(
        !signed_in(&mut stolen, &portal).await.0,
        "signed in after sign-out"
    );

    // The slow request finishes after the sign-out (and saves the session it modified).
    release_tx.send(true).unwrap();
    let status = in_flight.await.unwrap();
    assert!(status.is_success(), "the slow request: {status}");

    // The old cookie is worth nothing, now and later.
    for _ in 0..2 {
        let mut stolen = Browser::new(&portal);
        stolen.cookie = cookie.clone();
        let (signed_in, _) = signed_in(&mut stolen, &portal).await;
        assert!(!signed_in, "the signed-out session is alive again");
    }
    let mut stolen = Browser::new(&portal);
    stolen.cookie = cookie;
    let page = stolen
        .post(&format!("{}/api/list_activity", portal.url), &[])
        .await;
    assert_eq!(page.status(), 401);
}
