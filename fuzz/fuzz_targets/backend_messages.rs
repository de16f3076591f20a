//! Fuzz target for the backend side of the replication connection, without the socket: message
//! framing (`split_frame`, `frame_bytes_missing`, the per-type length bounds), parsing each
//! message as the connection does (`parse_backend`: ErrorResponse and NoticeResponse fields,
//! ParameterStatus, DataRow values, CopyBothResponse, authentication requests, …), keeping
//! parameters within their bound (`ServerParameters`) and reading the rows as an
//! `IDENTIFY_SYSTEM` answer (`parse_identify_system`). All must return `Ok` or `Err`, never
//! panic; framing must take exactly what each header declares and never consume an incomplete
//! message.
//!
//! Input: a stream of backend bytes, as read from the socket.
//!
//! Run: `cargo fuzz run --sanitizer none backend_messages fuzz/seeds/backend_messages`
//! (or `.ci/fuzz-smoke.sh`). Seeds: `python3 fuzz/write_seeds.py`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use synapse_account_data_relay::replication::connection::{
    HEADER_LEN, ParsedBackend, ServerParameters, frame_bytes_missing, parse_backend, parse_identify_system, split_frame,
};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut rows = Vec::new();
    let mut parameters = ServerParameters::default();
    loop {
        let before = buf.len();
        let missing = frame_bytes_missing(&buf);
        match split_frame(&mut buf) {
            Ok(Some(frame)) => {
                assert!(frame.bytes.len() >= HEADER_LEN);
                let declared = u32::from_be_bytes([frame.bytes[1], frame.bytes[2], frame.bytes[3], frame.bytes[4]]);
                assert_eq!(
                    frame.bytes.len(),
                    declared as usize + 1,
                    "frame is not what its header declares"
                );
                assert_eq!(buf.len() + frame.bytes.len(), before);
                assert_eq!(missing, 0);
                match parse_backend(frame) {
                    Ok(ParsedBackend::Row(values)) => rows.push(values),
                    Ok(ParsedBackend::Parameter { name, value }) => {
                        let _ = parameters.record(&name, &value);
                    }
                    Ok(ParsedBackend::Error(e) | ParsedBackend::Notice(e)) => {
                        let _ = e.to_string();
                    }
                    Ok(_) => {}
                    Err(problem) => {
                        let _ = problem.len();
                    }
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete message was consumed");
                assert!(missing >= 1);
                break;
            }
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
    match parse_identify_system(&rows) {
        Ok(identity) => assert_eq!(rows.len(), 1, "{identity:?}"),
        Err(problem) => {
            let _ = problem.len();
        }
    }
});
