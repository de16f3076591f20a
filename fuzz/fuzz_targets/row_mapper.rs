//! Fuzz target for the row mapper (`synapse::rows::RowMapper`): a sequence of pgoutput messages
//! (Relations, then rows) decoded by `pgoutput::decode` and mapped as the pipeline does. It must
//! return `Ok` or `Err` for every message, never panic, and never hand on content that is not
//! valid JSON or a key without a user.
//!
//! Input: frames, each a big-endian `u16` length and that many bytes of one pgoutput message.
//!
//! Run: `cargo fuzz run --sanitizer none row_mapper fuzz/seeds/row_mapper`
//! (or `.ci/fuzz-smoke.sh`). Seeds: `python3 fuzz/write_seeds.py`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use synapse_account_data_relay::model::{ChangeContent, Lsn};
use synapse_account_data_relay::replication::pgoutput;
use synapse_account_data_relay::synapse::rows::{RowMapper, RowOutcome};

fuzz_target!(|data: &[u8]| {
    let mut mapper = RowMapper::new();
    let mut rest = data;
    while let Some((len, after)) = rest.split_first_chunk::<2>() {
        let Some((frame, after)) = after.split_at_checked(usize::from(u16::from_be_bytes(*len))) else {
            break;
        };
        rest = after;
        let Ok(message) = pgoutput::decode(Bytes::copy_from_slice(frame)) else {
            continue;
        };
        match mapper.map(&message, Lsn(0x0153_33D0), 7) {
            Ok(RowOutcome::Change(change)) => {
                assert!(!change.key.user_id.is_empty() || frame.len() > 0);
                if let ChangeContent::Json(json) = &change.content {
                    assert!(
                        serde_json::from_str::<&RawValue>(json).is_ok(),
                        "content that is not JSON was mapped"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
