//! Which appservices are interested in a user: Synapse's rule, exactly.
//!
//! Synapse (`ApplicationService.is_interested_in_user`) says an appservice is interested in a user
//! when the user is the appservice's sender (`@<sender_localpart>:<server_name>`) or a regex of its
//! `users` namespace matches with Python's `re.match`: anchored at the start only (no implicit
//! `$`), case-sensitive, Python syntax. `@irc_.*` and `@irc_` are both prefix matches; `@a:x\.org`
//! also matches `@a:x.org.evil`.
//!
//! Three engines, one answer:
//! - **literal shapes**, what bridges nearly always write (`@telegram_.*:example\.org`,
//!   `@_irc_.+`, `@bot:example\.org`): a literal prefix, optionally `.*` or `.+`, optionally a
//!   literal suffix. Recognised from the parsed pattern (`regex-syntax`), never from its text, and
//!   matched without a regex engine: the user id's prefixes are looked up in one hash map per
//!   distinct prefix length, so 5,000 such namespaces cost a handful of lookups per user id;
//! - every other namespace regex is compiled as `^(?:PATTERN)` into one [`regex::RegexSet`], so one
//!   scan of the user id answers for all of them;
//! - patterns the `regex` crate rejects (lookaround, backreferences) are compiled with
//!   `fancy-regex` instead and checked one by one ([`Router::fallback_namespaces`], named at
//!   start). A user id that exceeds such a pattern's backtrack limit counts as no match, and
//!   [`Router::route_into`] says so, for the caller to count and log.
//!
//! Python's `\Z` is rewritten to `\z` first. A pattern no engine accepts is an error naming its
//! registration file. Pure: no I/O.

use std::collections::HashMap;
use std::path::PathBuf;

/// Whether `user_id` (`@localpart:server_name`, where the server name may carry a port) belongs
/// to the homeserver `server_name`.
pub fn is_local_user(user_id: &str, server_name: &str) -> bool {
    user_id
        .strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(_, server)| server == server_name)
}

/// What the router needs to know about one appservice.
#[derive(Debug, Clone)]
pub struct AppserviceInterest {
    pub id: String,
    pub sender_user_id: String,
    pub user_regexes: Vec<String>,
    /// The registration file, for error messages.
    pub source: PathBuf,
}

/// A namespace regex that no engine accepts.
#[derive(Debug, thiserror::Error)]
#[error(
    "{source_file}: appservice {appservice:?}: users namespace regex {pattern:?} is not a regex the relay can run \
     (regex: {regex_error}; fancy-regex: {fancy_error})"
)]
pub struct RoutingError {
    pub source_file: PathBuf,
    pub appservice: String,
    pub pattern: String,
    pub regex_error: String,
    pub fancy_error: String,
}

/// A pattern that compiles but may not mean what it means in Python.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingWarning {
    pub appservice: String,
    pub pattern: String,
    pub message: String,
}

/// A namespace of the literal shape `PREFIX`, `PREFIX.*SUFFIX` or `PREFIX.+SUFFIX` (the suffix
/// possibly empty), with Python's `re.match` semantics: anchored at the start only, `.` any
/// character but a newline.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LiteralShape {
    prefix: String,
    /// `None`: nothing after the prefix. `Some(min)`: `.*` (0) or `.+` (1), then `suffix`.
    any: Option<u32>,
    suffix: String,
}

impl LiteralShape {
    /// The shape of `pattern` (already translated to Rust syntax), if it has one.
    fn of(pattern: &str) -> Option<LiteralShape> {
        use regex_syntax::hir::{Dot, Hir, HirKind};
        let hir = regex_syntax::parse(pattern).ok()?;
        let mut top = &hir;
        while let HirKind::Capture(c) = top.kind() {
            top = &c.sub;
        }
        let mut parts: Vec<&Hir> = match top.kind() {
            HirKind::Concat(parts) => parts.iter().collect(),
            _ => vec![top],
        };
        // Captures around a part change nothing for matching.
        for part in parts.iter_mut() {
            while let HirKind::Capture(c) = part.kind() {
                *part = &c.sub;
            }
        }
        let dot = Hir::dot(Dot::AnyCharExceptLF);
        let mut shape = LiteralShape {
            prefix: String::new(),
            any: None,
            suffix: String::new(),
        };
        for part in parts {
            let text = match part.kind() {
                HirKind::Literal(l) => std::str::from_utf8(&l.0).ok()?,
                HirKind::Empty => "",
                HirKind::Repetition(r) if shape.any.is_none() && r.max.is_none() && r.min <= 1 && *r.sub == dot => {
                    shape.any = Some(r.min);
                    continue;
                }
                _ => return None,
            };
            match shape.any {
                None => shape.prefix.push_str(text),
                Some(_) => shape.suffix.push_str(text),
            }
        }
        Some(shape)
    }

    /// `re.match` of this shape on `user_id`, which is known to start with the prefix.
    fn matches_rest(&self, rest: &str) -> bool {
        let Some(min) = self.any else { return true };
        // The first place the suffix can start: after `min` characters.
        let first = match min {
            0 => 0,
            _ => match rest.chars().next() {
                Some(c) => c.len_utf8(),
                None => return false,
            },
        };
        // `.` stops at a newline; the earliest occurrence of the suffix is the one to try, as
        // any later one would span at least the same characters.
        let at = match rest[first..].find(self.suffix.as_str()) {
            Some(at) => first + at,
            None => return false,
        };
        !rest[..at].contains('\n')
    }
}

/// Prefix → the literal shapes with that prefix, with their appservices.
type ShapesByPrefix = HashMap<String, Vec<(LiteralShape, usize)>>;

/// Literal-shape namespaces indexed by prefix: one map per distinct prefix length.
#[derive(Debug, Default)]
struct PrefixIndex {
    /// (prefix length in bytes, prefix → (shape, appservice) pairs), by length.
    by_length: Vec<(usize, ShapesByPrefix)>,
}

impl PrefixIndex {
    fn insert(&mut self, shape: LiteralShape, appservice: usize) {
        let len = shape.prefix.len();
        let slot = match self.by_length.iter().position(|(l, _)| *l == len) {
            Some(i) => i,
            None => {
                self.by_length.push((len, HashMap::new()));
                self.by_length.len() - 1
            }
        };
        let entries = self.by_length[slot].1.entry(shape.prefix.clone()).or_default();
        if !entries.contains(&(shape.clone(), appservice)) {
            entries.push((shape, appservice));
        }
    }

    fn is_empty(&self) -> bool {
        self.by_length.is_empty()
    }

    fn matches_into(&self, user_id: &str, out: &mut Vec<usize>) {
        for (len, map) in &self.by_length {
            let Some(head) = user_id.get(..*len) else { continue };
            if let Some(entries) = map.get(head) {
                let rest = &user_id[*len..];
                out.extend(entries.iter().filter(|(s, _)| s.matches_rest(rest)).map(|(_, a)| *a));
            }
        }
    }
}

/// A namespace regex only `fancy-regex` accepts (lookaround, backreferences): checked on its own,
/// by backtracking, with fancy-regex's backtrack limit.
#[derive(Debug)]
pub struct FallbackNamespace {
    regex: fancy_regex::Regex,
    owner: usize,
    /// The appservice's id and the pattern as written in its registration, for logs.
    pub appservice: String,
    pub pattern: String,
}

/// user id → indices (into the slice given to [`Router::new`]) of the interested appservices.
#[derive(Debug)]
pub struct Router {
    literal: PrefixIndex,
    set: regex::RegexSet,
    /// For each pattern of `set`, the appservice it belongs to.
    set_owner: Vec<usize>,
    fancy: Vec<FallbackNamespace>,
    senders: HashMap<String, Vec<usize>>,
    warnings: Vec<RoutingWarning>,
    appservice_count: usize,
}

impl Router {
    pub fn new(appservices: &[AppserviceInterest]) -> Result<Router, RoutingError> {
        let mut literal = PrefixIndex::default();
        let mut set_patterns = Vec::new();
        let mut set_owner = Vec::new();
        let mut fancy = Vec::new();
        let mut senders: HashMap<String, Vec<usize>> = HashMap::new();
        let mut warnings = Vec::new();
        for (i, a) in appservices.iter().enumerate() {
            senders.entry(a.sender_user_id.clone()).or_default().push(i);
            for p in &a.user_regexes {
                let translated = translate_python_syntax(p);
                let anchored = format!("^(?:{translated})");
                if let Some(message) = python_difference(p) {
                    warnings.push(RoutingWarning {
                        appservice: a.id.clone(),
                        pattern: p.clone(),
                        message,
                    });
                }
                if let Some(shape) = LiteralShape::of(&translated) {
                    literal.insert(shape, i);
                    continue;
                }
                match regex::Regex::new(&anchored) {
                    Ok(_) => {
                        set_patterns.push(anchored);
                        set_owner.push(i);
                    }
                    Err(regex_error) => match fancy_regex::Regex::new(&anchored) {
                        Ok(regex) => fancy.push(FallbackNamespace {
                            regex,
                            owner: i,
                            appservice: a.id.clone(),
                            pattern: p.clone(),
                        }),
                        Err(fancy_error) => {
                            return Err(RoutingError {
                                source_file: a.source.clone(),
                                appservice: a.id.clone(),
                                pattern: p.clone(),
                                regex_error: first_line(&regex_error.to_string()),
                                fancy_error: first_line(&fancy_error.to_string()),
                            });
                        }
                    },
                }
            }
        }
        let set = regex::RegexSetBuilder::new(&set_patterns)
            .size_limit(256 << 20)
            .dfa_size_limit(64 << 20)
            .build()
            .map_err(|e| RoutingError {
                source_file: PathBuf::new(),
                appservice: String::new(),
                pattern: format!("({} patterns together)", set_patterns.len()),
                regex_error: first_line(&e.to_string()),
                fancy_error: String::new(),
            })?;
        Ok(Router {
            literal,
            set,
            set_owner,
            fancy,
            senders,
            warnings,
            appservice_count: appservices.len(),
        })
    }

    /// Patterns that compile but may behave unlike Python; log them at start.
    pub fn warnings(&self) -> &[RoutingWarning] {
        &self.warnings
    }

    /// The namespaces that need the fallback engine (say so at start: they are slower, and a user
    /// id can exceed their backtrack limit).
    pub fn fallback_namespaces(&self) -> &[FallbackNamespace] {
        &self.fancy
    }

    /// Write into `out` the sorted, distinct indices of the appservices interested in `user_id`.
    /// Returns how many fallback namespaces could not answer for `user_id` because it exceeds
    /// their backtrack limit (they count as no match, as Synapse's own limit-less `re.match`
    /// would not; see [`Router::backtrack_limit_exceeded`] for which); normally 0.
    pub fn route_into(&self, user_id: &str, out: &mut Vec<usize>) -> usize {
        out.clear();
        if let Some(s) = self.senders.get(user_id) {
            out.extend_from_slice(s);
        }
        if !self.literal.is_empty() {
            self.literal.matches_into(user_id, out);
        }
        if !self.set_owner.is_empty() {
            out.extend(self.set.matches(user_id).into_iter().map(|p| self.set_owner[p]));
        }
        let mut limit_exceeded = 0;
        for f in &self.fancy {
            match f.regex.is_match(user_id) {
                Ok(true) => out.push(f.owner),
                Ok(false) => {}
                // Only the backtrack limit can fail a match of a compiled regex.
                Err(_) => limit_exceeded += 1,
            }
        }
        out.sort_unstable();
        out.dedup();
        limit_exceeded
    }

    /// The fallback namespaces that exceed their backtrack limit on `user_id` (for the log,
    /// when [`Router::route_into`] says there are some).
    pub fn backtrack_limit_exceeded(&self, user_id: &str) -> Vec<&FallbackNamespace> {
        self.fancy
            .iter()
            .filter(|f| f.regex.is_match(user_id).is_err())
            .collect()
    }

    /// Convenience form of [`Router::route_into`].
    pub fn route(&self, user_id: &str) -> Vec<usize> {
        let mut v = Vec::new();
        self.route_into(user_id, &mut v);
        v
    }

    pub fn appservice_count(&self) -> usize {
        self.appservice_count
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rewrite the few Python spellings the Rust engines lack: `\Z` (end of string) becomes `\z`.
/// Escaped backslashes are skipped over, so `\\Z` (a backslash, then `Z`) is left alone.
fn translate_python_syntax(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Z') => out.push_str("\\z"),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Constructs Python reads differently from Rust's engines.
fn python_difference(p: &str) -> Option<String> {
    if p.contains("[:") && p.contains(":]") {
        return Some("POSIX classes like [[:alpha:]] are literal characters in Python but classes here".into());
    }
    if p.contains("&&") || p.contains("--") || p.contains("~~") {
        return Some("`&&`, `--` and `~~` inside [...] are literal in Python but set operations here".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interest(id: &str, sender: &str, regexes: &[&str]) -> AppserviceInterest {
        AppserviceInterest {
            id: id.into(),
            sender_user_id: sender.into(),
            user_regexes: regexes.iter().map(|s| s.to_string()).collect(),
            source: format!("/etc/{id}.yaml").into(),
        }
    }

    /// (pattern, user id, what Python's `re.match(pattern, user_id) is not None` gives).
    /// Each row was checked with CPython 3.11 (`re.match`), by a script over this table.
    const PYTHON_RE_MATCH: &[(&str, &str, bool)] = &[
        ("@irc_.*", "@irc_alice:example.org", true),
        ("@irc_.*", "@irc_:example.org", true),
        ("@irc_.*", "@bob:example.org", false),
        ("@irc_.*", "x@irc_alice:example.org", false),
        // `@irc_*` is `@irc` followed by any number of `_`: still a prefix match.
        ("@irc_*", "@ircalice:example.org", true),
        ("@irc_*", "@irc___x:example.org", true),
        ("@irc_*", "@ir:example.org", false),
        // Anchored at the start only: no implicit `$`.
        ("@a_.*:example\\.org", "@a_x:example.org.evil", true),
        ("@a_.*:example\\.org$", "@a_x:example.org.evil", false),
        ("@a_.*:example\\.org$", "@a_x:example.org", true),
        // `.` is any character; escaped it is a dot.
        ("@a:example.org", "@a:exampleXorg", true),
        ("@a:example\\.org", "@a:exampleXorg", false),
        // Escaped punctuation Python accepts.
        ("\\@telegram_\\d+:example\\.org", "@telegram_123:example.org", true),
        ("\\@telegram_\\d+:example\\.org", "@telegram_abc:example.org", false),
        // Case-sensitive.
        ("@IRC_.*", "@irc_a:example.org", false),
        ("(?i)@IRC_.*", "@irc_a:example.org", true),
        // Lookahead (needs fancy-regex).
        ("@(?!admin)[a-z]+:example\\.org", "@alice:example.org", true),
        ("@(?!admin)[a-z]+:example\\.org", "@admin:example.org", false),
        // Lookbehind and backreference.
        ("@(a)\\1:x", "@aa:x", true),
        ("@(a)\\1:x", "@ab:x", false),
        ("@.*(?<!bot):example\\.org", "@alice:example.org", true),
        ("@.*(?<!bot):example\\.org", "@alicebot:example.org", false),
        // \Z: end of string in Python.
        ("@exact:example\\.org\\Z", "@exact:example.org", true),
        ("@exact:example\\.org\\Z", "@exact:example.orgx", false),
        ("@back\\\\Z", "@back\\Z", true),
        // Alternation binds inside the anchor group: `^(?:a|b)`, not `^a|b`.
        ("@a:x|@b:x", "@b:x", true),
        ("@a:x|@b:x", "c@b:x", false),
        // Character classes and counted repetition.
        ("@[0-9]{3}:x", "@123:x", true),
        ("@[0-9]{3}:x", "@12:x", false),
        ("@_discord_[0-9]+:example\\.org", "@_discord_5:example.org", true),
        // Empty pattern matches everything (as in Python).
        ("", "@anyone:example.org", true),
    ];

    #[test]
    fn namespace_regexes_match_like_python_re_match() {
        for (pattern, user, expected) in PYTHON_RE_MATCH {
            let router = Router::new(&[interest("a", "@sender:x", &[pattern])])
                .unwrap_or_else(|e| panic!("pattern {pattern:?} rejected: {e}"));
            let got = router.route(user) == vec![0];
            assert_eq!(got, *expected, "re.match({pattern:?}, {user:?})");
        }
    }

    /// A fallback pattern that backtracks too much on a user id is reported, not silently
    /// taken as no match; the other engines still answer; the namespace is listed at start.
    #[test]
    fn backtrack_limit_exceeded_is_reported() {
        let r = Router::new(&[
            interest("a", "@abot:x", &[r"@((a|aa)+)\1:x"]),
            interest("b", "@bbot:x", &["@a.*"]),
        ])
        .unwrap();
        let fallback: Vec<(&str, &str)> = r
            .fallback_namespaces()
            .iter()
            .map(|f| (f.appservice.as_str(), f.pattern.as_str()))
            .collect();
        assert_eq!(fallback, vec![("a", r"@((a|aa)+)\1:x")]);
        let mut out = Vec::new();
        assert_eq!(r.route_into("@aaaa:x", &mut out), 0);
        assert_eq!(out, vec![0, 1]);
        let hostile = format!("@{}b", "a".repeat(60));
        assert_eq!(r.route_into(&hostile, &mut out), 1);
        assert_eq!(out, vec![1]);
        let hit: Vec<&str> = r
            .backtrack_limit_exceeded(&hostile)
            .iter()
            .map(|f| f.appservice.as_str())
            .collect();
        assert_eq!(hit, vec!["a"]);
        assert!(r.backtrack_limit_exceeded("@aaaa:x").is_empty());
    }

    #[test]
    fn local_users_are_told_apart() {
        assert!(is_local_user("@a:example.org", "example.org"));
        assert!(is_local_user("@a:example.org:8448", "example.org:8448"));
        assert!(!is_local_user("@a:example.org:8448", "example.org"));
        assert!(!is_local_user("@a:other.org", "example.org"));
        assert!(!is_local_user("@a:example.org.evil", "example.org"));
        assert!(!is_local_user("a:example.org", "example.org"));
        assert!(!is_local_user("@nocolon", "example.org"));
    }

    #[test]
    fn the_sender_user_is_always_interesting() {
        let r = Router::new(&[interest("a", "@abot:example.org", &["@a_.*"])]).unwrap();
        assert_eq!(r.route("@abot:example.org"), vec![0]);
        assert_eq!(
            r.route("@abot:example.org.evil"),
            Vec::<usize>::new(),
            "the sender is an exact match"
        );
        let r = Router::new(&[interest("a", "@abot:example.org", &[])]).unwrap();
        assert_eq!(r.route("@abot:example.org"), vec![0]);
        assert!(r.route("@a_x:example.org").is_empty());
    }

    #[test]
    fn several_appservices_and_engines_route_together() {
        let r = Router::new(&[
            interest("irc", "@ircbot:x", &["@irc_.*", "@shared_.*"]),
            interest("tg", "@tgbot:x", &["@tg_.*", "@shared_.*", "@(?!tg_admin)tg.*"]),
            interest("none", "@nonebot:x", &[]),
        ])
        .unwrap();
        assert_eq!(r.route("@irc_a:x"), vec![0]);
        assert_eq!(r.route("@shared_a:x"), vec![0, 1]);
        assert_eq!(r.route("@tg_a:x"), vec![1]);
        assert_eq!(r.route("@tgfoo:x"), vec![1]);
        assert_eq!(r.route("@nonebot:x"), vec![2]);
        assert!(r.route("@stranger:x").is_empty());
        assert_eq!(r.appservice_count(), 3);
    }

    #[test]
    fn an_impossible_pattern_names_file_appservice_and_pattern() {
        let err = Router::new(&[interest("broken", "@b:x", &["@ok_.*", "@bad_(unclosed"])]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/etc/broken.yaml") && text.contains("\"broken\"") && text.contains("@bad_(unclosed"),
            "{text}"
        );
    }

    #[test]
    fn python_differences_are_warned_about() {
        let r = Router::new(&[interest("a", "@s:x", &["@[[:alpha:]]+:x", "@plain_.*"])]).unwrap();
        assert_eq!(r.warnings().len(), 1);
        assert_eq!(r.warnings()[0].pattern, "@[[:alpha:]]+:x");
    }

    #[test]
    fn literal_shapes_are_recognised_from_the_parsed_pattern() {
        let shape = |p: &str| LiteralShape::of(&translate_python_syntax(p));
        let s = shape("@telegram_.*:example\\.org").unwrap();
        assert_eq!(
            (s.prefix.as_str(), s.any, s.suffix.as_str()),
            ("@telegram_", Some(0), ":example.org")
        );
        let s = shape("@_irc_.+").unwrap();
        assert_eq!((s.prefix.as_str(), s.any, s.suffix.as_str()), ("@_irc_", Some(1), ""));
        let s = shape("@bot:example\\.org").unwrap();
        assert_eq!((s.prefix.as_str(), s.any), ("@bot:example.org", None));
        let s = shape("(@wa_.*)").unwrap();
        assert_eq!((s.prefix.as_str(), s.any), ("@wa_", Some(0)));
        assert_eq!(shape("").unwrap().prefix, "");
        // Everything else goes to a regex engine.
        for p in [
            "@a:example.org",       // `.` unescaped is a class
            "@a_.*:example\\.org$", // an end anchor
            "@x_.*_.*:y",           // two repetitions
            "(?i)@irc_.*",          // case-insensitive
            "@[0-9]+:x",            // a class
            "@(?s:.*)x",            // `.` matching newlines too
        ] {
            let got = shape(p);
            assert!(got.is_none(), "{p} taken for a literal shape: {got:?}");
        }
        // Lazy repetition matches the same user ids: still a literal shape.
        assert_eq!(shape("@a.*?b").unwrap().suffix, "b");
    }

    proptest::proptest! {
        /// The literal-shape engine answers exactly as the regex engine does for the same pattern.
        #[test]
        fn literal_shapes_match_like_the_regex_engine(
            prefix in "[@a_\\n]{0,3}",
            any in proptest::option::of(0u32..2),
            suffix in "[:a.\\n]{0,3}",
            user in "[@a_:.\\nü]{0,8}",
        ) {
            let esc = |s: &str| regex::escape(s);
            let pattern = match any {
                None => esc(&prefix),
                Some(0) => format!("{}.*{}", esc(&prefix), esc(&suffix)),
                Some(_) => format!("{}.+{}", esc(&prefix), esc(&suffix)),
            };
            let shape = LiteralShape::of(&pattern).expect("a literal shape");
            let fast = user.starts_with(&shape.prefix) && shape.matches_rest(&user[shape.prefix.len()..]);
            let slow = regex::Regex::new(&format!("^(?:{pattern})")).unwrap().is_match(&user);
            proptest::prop_assert_eq!(fast, slow, "pattern {:?} user {:?}", pattern, user);
        }
    }

    #[test]
    fn five_thousand_namespaces_compile_and_route() {
        let mut list = Vec::new();
        for i in 0..100 {
            let regexes: Vec<String> = (0..50).map(|j| format!("@as{i}_ns{j}_.*:example\\.org")).collect();
            list.push(AppserviceInterest {
                id: format!("as{i}"),
                sender_user_id: format!("@as{i}bot:example.org"),
                user_regexes: regexes,
                source: PathBuf::new(),
            });
        }
        let r = Router::new(&list).unwrap();
        assert_eq!(r.route("@as42_ns7_alice:example.org"), vec![42]);
        assert!(r.route("@as42_ns77_alice:example.org").is_empty());
    }
}
