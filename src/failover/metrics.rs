//! The failover-slot metrics, registered with the others (`crate::ops::metrics`) and set by the
//! running relay's look ([`super::inspect::watch`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::slots::Readiness;

/// The `standby` label: a physical slot named in `synchronized_standby_slots`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StandbyLabel {
    pub standby: String,
}

/// The failover-slot metrics (registered with the others, `ops::metrics`).
#[derive(Debug)]
pub struct FailoverMetrics {
    /// 1 safe, 0 not safe, -1 not watched (`replication.failover` off).
    pub safe: Gauge,
    pub standby_synced: Family<StandbyLabel, Gauge>,
    pub standby_lag: Family<StandbyLabel, Gauge>,
}

impl Default for FailoverMetrics {
    fn default() -> Self {
        let safe = Gauge::default();
        safe.set(-1);
        FailoverMetrics {
            safe,
            standby_synced: Family::default(),
            standby_lag: Family::default(),
        }
    }
}

impl FailoverMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "failover_slot_safe",
            "1 when every standby named in synchronized_standby_slots holds a synchronised, persisted copy of the \
             slot (a promotion keeps it), 0 when a promotion now would cost a resync, -1 when not watched \
             (replication.failover off)",
            self.safe.clone(),
        );
        r.register(
            "failover_slot_standby_synced",
            "Per standby (its physical slot): 1 if its copy of the relay's slot is synced and not temporary",
            self.standby_synced.clone(),
        );
        r.register_with_unit(
            "failover_slot_standby_lag",
            "Per standby: the slot's confirmed_flush_lsn on the primary minus its copy's",
            Unit::Bytes,
            self.standby_lag.clone(),
        );
    }

    pub(super) fn set(&self, r: &Readiness) {
        self.safe.set(i64::from(r.safe));
        self.standby_synced.clear();
        self.standby_lag.clear();
        for s in &r.standbys {
            let label = StandbyLabel {
                standby: s.standby_slot.clone(),
            };
            self.standby_synced.get_or_create(&label).set(i64::from(s.safe));
            if let Some(lag) = s.lag_bytes {
                self.standby_lag
                    .get_or_create(&label)
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
        }
    }
}
