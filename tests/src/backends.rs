//! Which backends a test runs on. `CLAW_TEST_BACKEND=distributed` runs the in-process
//! gateway suites on real Kafka and PostgreSQL (from `scripts/services.sh`, named by
//! `CLAW_KAFKA_BROKERS` and `CLAW_DATABASE_URL`); anything else runs them embedded. Each
//! distributed test gets its own topic and its own database, so tests stay independent and
//! can run in parallel against one broker and one server.

use sqlx::{Connection as _, Executor as _, PgConnection};

/// Where a distributed test's ledger and read models live.
#[derive(Debug, Clone)]
pub struct Distributed {
    pub brokers: String,
    /// A fresh topic (its consumer group defaults to `<topic>.projector`).
    pub topic: String,
    /// `postgres://…` of a fresh database.
    pub database_url: String,
}

/// Whether the suites run distributed.
pub fn distributed_requested() -> bool {
    std::env::var("CLAW_TEST_BACKEND").is_ok_and(|b| b == "distributed")
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the services with `scripts/services.sh up` and `eval \"$(scripts/services.sh env)\"`"
        )
    })
}

impl Distributed {
    /// A fresh topic name and a fresh, empty database on the services in the environment.
    pub async fn fresh() -> Self {
        let brokers = required("CLAW_KAFKA_BROKERS");
        let admin_url = required("CLAW_DATABASE_URL");
        let id = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("claw_test_{id}");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL answers at CLAW_DATABASE_URL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .await
            .expect("create the test database");
        let database_url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database}"),
            None => panic!("CLAW_DATABASE_URL has no database name: {admin_url}"),
        };
        Self {
            brokers,
            topic: format!("claw.test.{id}"),
            database_url,
        }
    }

    /// The `nself claw serve` flags that select these backends.
    pub fn serve_flags(&self) -> Vec<String> {
        vec![
            "--kafka-brokers".into(),
            self.brokers.clone(),
            "--kafka-topic".into(),
            self.topic.clone(),
            "--database-url".into(),
            self.database_url.clone(),
        ]
    }

    /// The projector service's settings for these backends.
    pub fn projector_config(&self) -> claw_projector::service::ServiceConfig {
        claw_projector::service::ServiceConfig {
            kafka: claw_ledger::kafka::KafkaConfig {
                brokers: self.brokers.clone(),
                topic: self.topic.clone(),
                partitions: 6,
                replication: 1,
                producer: "test-projector".into(),
            },
            group: claw_projector::service::default_group(&self.topic),
            database_url: self.database_url.clone(),
        }
    }
}
