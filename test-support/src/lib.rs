//! What the test suites of several Gatehouse crates share.
//!
//! Tests that need PostgreSQL each make a database of their own on the tests' server, so that
//! they run in parallel and leave nothing behind ([`TestDatabase`]).
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure here is the test's failure"
)]

/// The URL of the tests' PostgreSQL server, as a user that may create databases:
/// `GATEHOUSE_TEST_POSTGRES_URL`, else the local server (`postgres@127.0.0.1:5432`).
fn postgres_admin_url() -> String {
    std::env::var("GATEHOUSE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// An empty PostgreSQL database of a test's own, dropped with this value, also when the test
/// fails (its panic unwinds through the drop).
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    /// Its URL.
    pub url: String,
}

impl TestDatabase {
    /// Creates a database named `{prefix}_{random}`; `prefix` tells whose it is should one be
    /// left behind (a test process killed outright).
    pub async fn new(prefix: &str) -> TestDatabase {
        assert!(
            prefix.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "a database prefix is lower-case letters and _"
        );
        let admin_url = postgres_admin_url();
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL at GATEHOUSE_TEST_POSTGRES_URL or 127.0.0.1:5432");
        // The name is made of the checked prefix and a UUID, never of input.
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = admin_url
            .rsplit_once('/')
            .map(|(base, _)| format!("{base}/{name}"))
            .expect("the admin URL names a database");
        TestDatabase { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // From a thread with its own runtime: Drop cannot await, and the test's runtime may be
        // blocked or unwinding. `WITH (FORCE)` ends the connections still open to it.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = sqlx::PgPool::connect(&postgres_admin_url()).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
            });
        })
        .join()
        .unwrap();
    }
}
