//! The projector: folds the ledger into the read models people and the gateway look at (keys,
//! per-key totals, daily usage), idempotently by `event_id`, advancing each partition's offset
//! in the same transaction. It runs in the gateway (embedded) or as its own service
//! ([`service`], distributed), answers the queries on those models, and proves them with
//! `audit`.

pub mod audit;
pub mod fold;
pub mod key_changes;
pub mod queries;
pub mod runner;
pub mod service;
pub mod sessions;
pub mod sign_outs;
pub mod store;
pub mod views;
pub mod watch;

pub use key_changes::{KeyChange, KeyChanges};
pub use runner::{Projector, ProjectorHandle, StoredStart, EMBEDDED_SOURCE};
pub use store::{ReadModels, StoreError};
pub use views::{
    parse_time_bound, KeyRecord, KeyUsage, RequestRow, UsageDocument, UsageFilter, UsageRow,
    UsageTotals,
};
