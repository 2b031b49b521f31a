//! A fresh config database per test, on SQLite (a temp dir) or PostgreSQL (127.0.0.1:5432, a
//! database created for the test and dropped after it).
#![allow(dead_code, reason = "each test file uses a part")]

use gatehouse_portal_core::ConfigDb;

/// A database and what keeps it alive.
pub struct TestDb {
    pub db: ConfigDb,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    database: Option<String>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(database) = self.database.take() else {
            return;
        };
        // Drop cannot await: drop the database from a thread with its own runtime.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
                sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                ))
                .execute(&admin)
                .await
                .unwrap();
            });
        })
        .join()
        .unwrap();
    }
}

pub fn admin_url() -> String {
    std::env::var("GATEHOUSE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("portal.db").display());
    TestDb {
        db: ConfigDb::open(&url).await.unwrap(),
        url,
        _dir: Some(dir),
        database: None,
    }
}

pub async fn postgres() -> TestDb {
    let database = format!("gh_portal_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    // The name is generated above from a UUID, never from input.
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = admin_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{database}"))
        .unwrap();
    TestDb {
        db: ConfigDb::open(&url).await.unwrap(),
        url,
        _dir: None,
        database: Some(database),
    }
}
