//! One fresh database per test on each engine, and the macro that runs a
//! test on all of them.

use std::sync::atomic::{AtomicU32, Ordering};

use herald_storage::{GroupCommit, Saver};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection};
use tempfile::TempDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    MySql,
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    pub engine: Engine,
    /// What `Saver::open` takes.
    pub url: String,
    /// The server the database lives on, and its name (networked engines).
    server: Option<(String, String)>,
    _dir: Option<TempDir>,
}

fn server_url(engine: Engine) -> String {
    let (var, default) = match engine {
        Engine::MySql => ("HERALD_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306"),
        Engine::Postgres => (
            "HERALD_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432",
        ),
        Engine::Sqlite => unreachable!("SQLite needs no server"),
    };
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

impl TestDb {
    /// A new empty database, or `None` when its server is not running and
    /// this is not CI (the test is then skipped, saying so).
    pub async fn create(engine: Engine, test: &str) -> Option<TestDb> {
        if engine == Engine::Sqlite {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite:{}", dir.path().join("herald.db").display());
            return Some(TestDb {
                engine,
                url,
                server: None,
                _dir: Some(dir),
            });
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "herald_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server = server_url(engine);
        if let Err(error) = admin(engine, &server, &format!("CREATE DATABASE {name}")).await {
            let message = format!(
                "{engine:?} is not reachable at {server} ({error}); \
                 start it with scripts/start-services.sh"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{message}");
            }
            eprintln!("SKIPPED {test} on {message}");
            return None;
        }
        let url = format!("{server}/{name}");
        Some(TestDb {
            engine,
            url,
            server: Some((server, name)),
            _dir: None,
        })
    }

    /// A saver on this database (each call is another node's pool).
    pub async fn open(&self) -> Saver {
        self.open_with(GroupCommit::default()).await
    }

    /// A saver on this database whose stores are grouped as `group_commit`
    /// says.
    pub async fn open_with(&self, group_commit: GroupCommit) -> Saver {
        Saver::open_with(&self.url, group_commit)
            .await
            .unwrap_or_else(|error| panic!("opening {:?} at {}: {error}", self.engine, self.url))
    }

    /// Runs one statement on this database outside the saver.
    pub async fn execute(&self, statement: &str) {
        let statement = AssertSqlSafe(statement.to_owned());
        match self.engine {
            Engine::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
            }
            Engine::MySql => {
                let mut conn = MySqlConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
            }
            Engine::Postgres => {
                let mut conn = PgConnection::connect(&self.url).await.unwrap();
                sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
            }
        }
    }
}

/// Runs `statement` on the server's administrative database.
async fn admin(engine: Engine, server: &str, statement: &str) -> Result<(), sqlx::Error> {
    let statement = AssertSqlSafe(statement.to_owned());
    match engine {
        Engine::MySql => {
            let mut conn = MySqlConnection::connect(server).await?;
            sqlx::raw_sql(statement).execute(&mut conn).await?;
        }
        Engine::Postgres => {
            let mut conn = PgConnection::connect(&format!("{server}/postgres")).await?;
            sqlx::raw_sql(statement).execute(&mut conn).await?;
        }
        Engine::Sqlite => unreachable!("SQLite needs no server"),
    }
    Ok(())
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.server.take() else {
            return;
        };
        let engine = self.engine;
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // the database is dropped from a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let statement = match engine {
                Engine::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                _ => format!("DROP DATABASE IF EXISTS {name}"),
            };
            runtime.block_on(admin(engine, &server, &statement))
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop test database: {error}");
        }
    }
}

/// Defines each listed `async fn(TestDb)` as a test on every engine:
/// `sqlite::name`, `mysql::name` and `postgres::name`.
#[macro_export]
macro_rules! on_every_engine {
    ($($test:ident),* $(,)?) => {
        $crate::on_engine!(sqlite, Sqlite, $($test),*);
        $crate::on_engine!(mysql, MySql, $($test),*);
        $crate::on_engine!(postgres, Postgres, $($test),*);
    };
}

#[macro_export]
macro_rules! on_engine {
    ($module:ident, $engine:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let engine = $crate::engines::Engine::$engine;
                    if let Some(db) =
                        $crate::engines::TestDb::create(engine, stringify!($test)).await
                    {
                        super::$test(db).await;
                    }
                }
            )*
        }
    };
}
