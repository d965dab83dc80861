//! The gateway's shared state: what every handler can reach (settings, the ledger's two sides,
//! the outbox, the read models and the projection's progress, the key cache, the tiers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_ledger::{Appender, Endpoint, LedgerReader, Outbox};
use claw_projector::{ProjectorHandle, ReadModels};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::accounting::RequestRecord;
use crate::config::Settings;
use crate::exchange::ExchangeDeps;
use crate::keys::KeyCache;
use crate::nself::admin::UsageCache;
use crate::nself::knowledge::KnowledgeBase;
use crate::nself::Prompts;
use crate::pricing::PriceTable;
use crate::router::Router;

/// What every handler can reach.
pub struct AppState {
    pub settings: Settings,
    /// Where facts are appended (the outbox drains into it; commands append directly).
    pub appender: Arc<dyn Appender>,
    /// The ledger read back (events, audits).
    pub reader: Arc<dyn LedgerReader>,
    /// Requests' facts on their way to the ledger.
    pub outbox: Outbox,
    pub store: ReadModels,
    /// How far the projection has folded: the in-process projector (embedded) or the
    /// read models' change notices (distributed).
    pub projector: ProjectorHandle,
    /// The projection's name for this ledger (its offsets are stored under it).
    pub source: String,
    /// `embedded` or `distributed`.
    pub mode: &'static str,
    pub keys: Arc<KeyCache>,
    pub router: Arc<Router>,
    /// The admin credential for `/claw/v1`.
    pub admin_token: String,
    /// The web console's sessions (signed with a key derived from the admin credential).
    pub sessions: crate::console::Sessions,
    /// This instance's name in the ledger's `producer` field.
    pub producer: String,
    pub metrics: PrometheusHandle,
    /// What paid models cost.
    pub prices: Arc<PriceTable>,
    /// The system prompts of the nSelf features.
    pub prompts: Prompts,
    /// Today's usage as admin mode last read it.
    pub admin_usage: UsageCache,
    /// The nSelf knowledge base.
    pub knowledge: Arc<KnowledgeBase>,
    /// Fetches remote images for providers that cannot.
    pub images: crate::images::ImageFetcher,
    /// Unix seconds at start, shown as `created` of listed models.
    pub started_at: i64,
}

impl AppState {
    /// A fresh accounting record for a request that passed auth and validation.
    pub fn request_record(
        &self,
        key_id: &str,
        request_id: String,
        endpoint: Endpoint,
        model_requested: &str,
        stream: bool,
        started: Instant,
    ) -> RequestRecord {
        RequestRecord {
            request_id,
            key_id: key_id.to_owned(),
            producer: self.producer.clone(),
            endpoint,
            model_requested: model_requested.to_owned(),
            stream,
            started,
            admin_mode: false,
            session_id: None,
            fallbacks: Vec::new(),
        }
    }

    /// Waits (up to `deadline`) until every request this gateway answered so far is in the
    /// ledger and folded into the read models, so that what an admin reads next includes them.
    pub async fn caught_up(&self, deadline: Duration) -> Result<(), String> {
        self.outbox
            .flush(deadline)
            .await
            .map_err(|e| e.to_string())?;
        let appended = self.appender.appended().borrow().clone();
        self.projector
            .wait_for(&appended, deadline)
            .await
            .map_err(|e| e.to_string())
    }

    pub fn exchange_deps(&self) -> ExchangeDeps {
        ExchangeDeps {
            prices: self.prices.clone(),
            outbox: self.outbox.clone(),
            idle_timeout: self.settings.timeouts().first_byte,
        }
    }
}
