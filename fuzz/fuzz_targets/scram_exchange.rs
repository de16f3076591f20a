//! Fuzz target for the client side of the SCRAM-SHA-256(-PLUS) exchange as the replication
//! connection runs it: the server's AuthenticationSASL message (parsed as the connection does,
//! with `parse_backend`), the mechanism choice (`choose_sasl_mechanism`), then the
//! server-first and server-final messages given to `postgres-protocol`'s `ScramSha256`. Every
//! step must return `Ok` or `Err`, never panic; the client's messages never carry the password.
//!
//! Input: byte 0 holds flags (bit 0: the connection is TLS with a certificate hash); then a
//! big-endian `u16` length and that many bytes of backend stream holding the AuthenticationSASL
//! message; then a `u16` length and the server-first message, where a leading `r=` is followed
//! by the client's nonce (so the fuzzer gets past the nonce check); the rest is the server-final
//! message. Iteration counts above 100,000 are skipped (PBKDF2 would only make the run slow).
//!
//! Run: `cargo fuzz run --sanitizer none scram_exchange fuzz/seeds/scram_exchange`
//! (or `.ci/fuzz-smoke.sh`). Seeds: `python3 fuzz/write_seeds.py`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
use synapse_account_data_relay::replication::connection::{
    Gs2ChannelBinding, ParsedBackend, SaslChoice, choose_sasl_mechanism, parse_backend, split_frame,
};

const PASSWORD: &[u8] = b"fuzz-password-never-sent";

fn take(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))
}

fn iterations_too_high(server_first: &[u8]) -> bool {
    let text = String::from_utf8_lossy(server_first);
    text.split(',')
        .filter_map(|part| part.strip_prefix("i="))
        .any(|i| i.parse::<u64>().map_or(true, |n| n > 100_000))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((sasl, rest)) = take(rest) else { return };
    let Some((server_first, server_final)) = take(rest) else {
        return;
    };
    let end_point: Option<&[u8]> = (flags & 1 == 1).then_some(&[0xAB; 32]);

    let mut buf = BytesMut::from(sasl);
    let Ok(Some(frame)) = split_frame(&mut buf) else { return };
    let Ok(ParsedBackend::SaslMechanisms(offered)) = parse_backend(frame) else {
        return;
    };
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let (mechanism, binding) = match choose_sasl_mechanism(&offered, end_point) {
        Some(SaslChoice::ScramSha256Plus(hash)) => {
            assert!(offered.contains(&SCRAM_SHA_256_PLUS) && end_point.is_some());
            (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash))
        }
        Some(SaslChoice::ScramSha256(flag)) => {
            assert!(offered.contains(&SCRAM_SHA_256));
            // Never claim "the server did not offer -PLUS" when it did (a downgrade to the server).
            if offered.contains(&SCRAM_SHA_256_PLUS) {
                assert_eq!(flag, Gs2ChannelBinding::NotSupported);
            }
            let binding = match flag {
                Gs2ChannelBinding::NotSupported => ChannelBinding::unsupported(),
                Gs2ChannelBinding::ServerDidNotOffer => ChannelBinding::unrequested(),
            };
            (SCRAM_SHA_256, binding)
        }
        None => return,
    };
    let _ = mechanism;
    let mut exchange = ScramSha256::new(PASSWORD, binding);
    let client_first = exchange.message().to_vec();
    assert!(!contains(&client_first, PASSWORD));
    // The client nonce: after "r=" in "n,,n=,r=<nonce>" (or "p=…"/"y,,…").
    let nonce = client_first
        .windows(2)
        .position(|w| w == b"r=")
        .map(|i| client_first[i + 2..].to_vec())
        .unwrap_or_default();
    let mut first = server_first.to_vec();
    if let Some(after) = first.strip_prefix(b"r=") {
        let mut with_nonce = b"r=".to_vec();
        with_nonce.extend_from_slice(&nonce);
        with_nonce.extend_from_slice(after);
        first = with_nonce;
    }
    if iterations_too_high(&first) {
        return;
    }
    if exchange.update(&first).is_err() {
        return;
    }
    let client_final = exchange.message().to_vec();
    assert!(!contains(&client_final, PASSWORD));
    let _ = exchange.finish(server_final);
});

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
