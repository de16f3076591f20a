//! Text that reaches a log line, an error, a metric label or systemd's `STATUS=` line (readable
//! by every local user), with the secrets taken out. Two kinds of text carry them:
//!
//! - **URLs** of appservices and of Synapse: a user name and password, tokens in the query
//!   string (`?access_token=…`, `?secret=…`), and tokens as path segments
//!   (`/hooks/8f14e45fceea167a5a36dedd4bea2543`). [`url`] hides all three; every URL the relay
//!   prints goes through it. reqwest's own errors embed the URL they failed on: callers strip it
//!   with `reqwest::Error::without_url` before printing.
//! - **Parse errors** of the configuration files. The TOML parser's message quotes the whole
//!   offending line, so a misspelt key or a bad escape on the `password` line printed the
//!   password. [`parse_error`] gives the position, the key and the parser's message, never the
//!   line; a value the message quotes (`invalid type: integer `12345``) is kept only when the
//!   key at the error is known and is not a secret one.

/// `url` for logs and messages: a user name or password becomes `***@`, every query value
/// `***`, any fragment `#***`, and each path segment that looks like a token (see
/// [`looks_like_token`]) `***`. An unparsable URL is redacted the same way on its text, or not
/// shown at all if it has an `@`.
pub fn url(url: &str) -> String {
    let text = match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) if url.contains('@') => return "(an unparsable URL with credentials, not shown)".to_owned(),
        Err(_) => url.to_owned(),
    };
    let (rest, fragment) = match text.split_once('#') {
        Some((r, _)) => (r, "#***"),
        None => (text.as_str(), ""),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(redact_query(q))),
        None => (rest, None),
    };
    // Leave the scheme and authority alone: only the path's segments can be tokens.
    let path_start = match rest.find("://") {
        Some(i) => rest[i + 3..].find('/').map(|j| i + 3 + j),
        None => rest.find('/'),
    };
    let mut out = String::with_capacity(text.len());
    match path_start {
        Some(p) => {
            out.push_str(&rest[..p]);
            let segments: Vec<&str> = rest[p + 1..]
                .split('/')
                .map(|s| if looks_like_token(s) { "***" } else { s })
                .collect();
            out.push('/');
            out.push_str(&segments.join("/"));
        }
        None => out.push_str(rest),
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(&q);
    }
    out.push_str(fragment);
    out
}

/// `name=value&…` with every value `***`; a part without `=` is kept only if it does not look
/// like a token.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|part| match part.split_once('=') {
            Some((name, "")) => format!("{name}="),
            Some((name, _)) => format!("{name}=***"),
            None if looks_like_token(part) => "***".to_owned(),
            None => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Does a path segment look like a secret rather than a name? At least 16 characters and either
/// a digit or both upper- and lower-case letters (random tokens, hex digests, UUIDs and base64
/// all are; `transactions`, `mautrix-telegram` and `matrix-appservice-irc` are not), or at least
/// 40 characters of anything.
pub fn looks_like_token(segment: &str) -> bool {
    let n = segment.chars().count();
    if n >= 40 {
        return true;
    }
    if n < 16 {
        return false;
    }
    let digit = segment.chars().any(|c| c.is_ascii_digit());
    let upper = segment.chars().any(|c| c.is_uppercase());
    let lower = segment.chars().any(|c| c.is_lowercase());
    digit || (upper && lower)
}

/// How keys are written in the file a parse error is about, to find the key at the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `key = value` under `[table]` headers.
    Toml,
    /// `key: value` (possibly as `- key: value` in a list).
    Yaml,
}

/// Keys whose values are secrets, by a part of their name (`password`, `smtp_pass`, `as_token`,
/// `macaroon_secret_key`, `client_secret`, `api_key`, …).
fn secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["pass", "token", "secret", "key", "credential", "auth"]
        .iter()
        .any(|w| last.contains(w))
}

/// A parse error of `source`, safe to print: `line L, column C, key `K`: message`.
///
/// `line` and `column` are 1-based (`None` when the parser did not say); `message` is the
/// parser's own message without any quoted source. The key is the one written at the start of
/// that line (with its `[table]` for TOML). The value a message may quote (serde's "invalid
/// type: string "…"", "unknown variant `…`") is replaced by `(value not shown)` unless the key
/// is known and not a secret one; key names and what the parser expected are always kept.
pub fn parse_error(source: &str, syntax: Syntax, line: Option<usize>, column: Option<usize>, message: &str) -> String {
    let key = line.and_then(|l| key_at_line(source, syntax, l));
    let message = match &key {
        Some(k) if !secret_key(k) => message.to_owned(),
        _ => redact_quoted_values(message),
    };
    let mut out = String::new();
    if let Some(l) = line {
        out.push_str(&format!("line {l}"));
        if let Some(c) = column {
            out.push_str(&format!(", column {c}"));
        }
    }
    if let Some(k) = key {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&format!("key `{k}`"));
    }
    if out.is_empty() {
        message
    } else {
        format!("{out}: {message}")
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A bare key: letters, digits, `_`, `-` and `.` (TOML's bare and dotted keys, YAML's usual
/// keys such as `org.matrix.msc3682.account_data`).
fn bare_key(text: &str) -> Option<(&str, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .unwrap_or(text.len());
    (end > 0).then(|| (&text[..end], &text[end..]))
}

/// The key written at the start of line `line` (1-based), if that line is `key = …` / `key: …`
/// or a TOML `[table]` header. Only the key's characters are ever taken from the line.
fn key_at_line(source: &str, syntax: Syntax, line: usize) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let text = lines.get(line.checked_sub(1)?)?.trim_start();
    match syntax {
        Syntax::Toml => {
            if let Some(header) = toml_header(text) {
                return Some(header.to_owned());
            }
            let (key, rest) = bare_key(text)?;
            if !rest.trim_start().starts_with('=') {
                return None;
            }
            let table = lines[..line - 1].iter().rev().find_map(|l| toml_header(l.trim_start()));
            Some(match table {
                Some(t) => format!("{t}.{key}"),
                None => key.to_owned(),
            })
        }
        Syntax::Yaml => {
            let text = text.strip_prefix("- ").map_or(text, str::trim_start);
            let (key, rest) = bare_key(text)?;
            rest.trim_start().starts_with(':').then(|| key.to_owned())
        }
    }
}

/// `[a.b]` or `[[a.b]]` → `a.b`, when the name is made of bare-key characters.
fn toml_header(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner).trim_start();
    let (name, rest) = bare_key(inner)?;
    rest.trim_start().starts_with(']').then_some(name)
}

/// `message` with every quoted value (`"…"` or `` `…` ``) replaced by `(value not shown)`, except
/// a key name (right after "field"/"key") and everything after "expected" (the parser's own
/// list of what it wanted).
fn redact_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut expected_seen = false;
    while let Some(i) = rest.find(['"', '`']) {
        let (before, from_quote) = rest.split_at(i);
        out.push_str(before);
        expected_seen |= out.contains("expected");
        let quote = from_quote.as_bytes()[0];
        let body = &from_quote[1..];
        // The closing quote; a `"` string is Rust's Debug form, where `\"` does not close it.
        let mut end = None;
        let mut escaped = false;
        for (j, b) in body.bytes().enumerate() {
            if escaped {
                escaped = false;
            } else if quote == b'"' && b == b'\\' {
                escaped = true;
            } else if b == quote {
                end = Some(j);
                break;
            }
        }
        let words = out.trim_end().rsplit(' ').next().unwrap_or("");
        let keep = expected_seen || matches!(words, "field" | "fields" | "key" | "keys");
        match end {
            Some(j) => {
                if keep {
                    out.push_str(&from_quote[..j + 2]);
                } else {
                    out.push_str("(value not shown)");
                }
                rest = &body[j + 1..];
            }
            None => {
                if keep {
                    out.push_str(from_quote);
                } else {
                    out.push_str("(value not shown)");
                }
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_query_values_and_token_paths_are_hidden() {
        assert_eq!(url("https://u:pw@as.example:8/x"), "https://***@as.example:8/x");
        assert_eq!(url("http://as.example/x"), "http://as.example/x");
        assert_eq!(url("http://as.example"), "http://as.example");
        assert!(!url("http://u:pw@[bad").contains("pw"));
        assert_eq!(
            url("https://as.example/bridge?access_token=S3CRETabc&debug&x="),
            "https://as.example/bridge?access_token=***&debug&x="
        );
        assert_eq!(
            url("https://as.example/hooks/8f14e45fceea167a5a36dedd4bea2543/in"),
            "https://as.example/hooks/***/in"
        );
        assert_eq!(
            url("https://as.example/a/0b6c32a4-9d4e-4f8e-a7c1-3f1b2c9d8e7f"),
            "https://as.example/a/***"
        );
        assert_eq!(url("http://as.example/?Zm9vYmFyYmF6cXV4MTIz"), "http://as.example/?***");
        assert_eq!(url("http://as.example/x#frag"), "http://as.example/x#***");
        // Names are kept, host names too (even with digits).
        assert_eq!(
            url("http://appservice01.example.org:9000/mautrix-telegram/matrix-appservice-irc"),
            "http://appservice01.example.org:9000/mautrix-telegram/matrix-appservice-irc"
        );
        // Unparsable: redacted on the text.
        assert_eq!(url("not a url/S3CRETtoken1234567890?k=v"), "not a url/***?k=***");
        assert_eq!(url("htp:/[x?access_token=S3CRET"), "htp:/[x?access_token=***");
    }

    #[test]
    fn token_heuristic() {
        for t in [
            "8f14e45fceea167a5a36dedd4bea2543",
            "AbCdEfGhIjKlMnOpQr",
            "a1b2c3d4e5f6g7h8",
        ] {
            assert!(looks_like_token(t), "{t}");
        }
        for n in [
            "transactions",
            "mautrix-telegram",
            "matrix-appservice-irc",
            "_matrix",
            "v1",
            "app",
        ] {
            assert!(!looks_like_token(n), "{n}");
        }
    }

    #[test]
    fn parse_errors_keep_values_of_ordinary_keys_only() {
        let src = "[postgres]\npassword = 12345\nport = \"x\"\n[replication]\non_slot_lost = \"ignore\"\n";
        let e = parse_error(
            src,
            Syntax::Toml,
            Some(2),
            Some(12),
            "invalid type: integer `12345`, expected a string",
        );
        assert_eq!(
            e,
            "line 2, column 12, key `postgres.password`: invalid type: integer (value not shown), expected a string"
        );
        let e = parse_error(
            src,
            Syntax::Toml,
            Some(5),
            Some(16),
            "unknown variant `ignore`, expected `resync`",
        );
        assert_eq!(
            e,
            "line 5, column 16, key `replication.on_slot_lost`: unknown variant `ignore`, expected `resync`"
        );
        // No key on the line (a string running on): values hidden, the parser's expectations kept.
        let src = "[postgres]\npassword = \"\"\"\nS3CRET\\q\"\"\"\n";
        let e = parse_error(
            src,
            Syntax::Toml,
            Some(3),
            Some(8),
            "missing escaped value, expected `b`, `\"`",
        );
        assert_eq!(e, "line 3, column 8: missing escaped value, expected `b`, `\"`");
        let e = parse_error(
            "",
            Syntax::Toml,
            None,
            None,
            "invalid type: string \"S3\\\"CRET\", expected u16",
        );
        assert_eq!(e, "invalid type: string (value not shown), expected u16");
        let e = parse_error("", Syntax::Yaml, None, None, "duplicate field `hs_token`, then `S3CRET");
        assert_eq!(e, "duplicate field `hs_token`, then (value not shown)");
        // A line without `=`: the key is not taken from it (it could be the secret).
        assert_eq!(key_at_line("[postgres]\npassword \"S3CRET\"\n", Syntax::Toml, 2), None);
        assert_eq!(key_at_line("[[a.b]]\n", Syntax::Toml, 1).as_deref(), Some("a.b"));
        assert_eq!(
            key_at_line("a:\n  - hs_token: x\n", Syntax::Yaml, 2).as_deref(),
            Some("hs_token")
        );
        assert_eq!(key_at_line("a:\n  S3CRET\n", Syntax::Yaml, 2), None);
        assert_eq!(line_and_column("ab\ncé\nx", 6), (2, 3));
    }
}
