//! Who a connection is and what it may do (docs/PROTOCOL.md,
//! "Authentication and permissions").
//!
//! A connection proves who it is once, at the handshake, with a signed
//! token (RFC 7519 JWT, verified by `jsonwebtoken`); from then on every
//! subscribe and publish is decided here against the token's grants, since
//! frames inside the pipe never pass an HTTP security chain again.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The close code of a session whose token expired (docs/PROTOCOL.md;
/// RFC 6455 7.4.2: 4000-4999 are the application's).
pub const EXPIRED_CLOSE: crate::ws::CloseCode = crate::ws::CloseCode(4001);

/// Topics under this first segment belong to one user each: `user.<id>`
/// (and `user.<id>.<anything>`).
pub const USER_SEGMENT: &str = "user";

/// How a route treats tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No token, no handshake: 401.
    Required,
    /// A valid token makes the connection its user's; none makes it
    /// anonymous, with the route's anonymous grants. A bad one is a 401.
    Optional,
    /// Tokens are not looked at; every topic but `user.*` is open.
    None,
}

/// Why a token was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAlgorithm,
    BadClaims,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Missing,
        Failure::Malformed,
        Failure::BadSignature,
        Failure::Expired,
        Failure::NotYetValid,
        Failure::WrongAlgorithm,
        Failure::BadClaims,
    ];

    /// The handshake's 401 for it (RFC 6750 3).
    pub fn reject(self) -> crate::ws::handshake::Reject {
        match self {
            Failure::Missing => crate::ws::handshake::Reject::TokenMissing,
            other => crate::ws::handshake::Reject::TokenRefused(other.reason()),
        }
    }

    /// The label of `/metrics` and the text of the 401's body.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Missing => "missing token",
            Failure::Malformed => "malformed token",
            Failure::BadSignature => "bad signature",
            Failure::Expired => "token expired",
            Failure::NotYetValid => "token not yet valid",
            Failure::WrongAlgorithm => "algorithm not accepted",
            Failure::BadClaims => "invalid claims",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::BadSignature => "bad_signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::WrongAlgorithm => "wrong_algorithm",
            Failure::BadClaims => "bad_claims",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// Topic patterns a session may subscribe and publish to. A pattern is a
/// topic name whose dot-separated segments may be `*` (exactly one
/// segment) or, last, `>` (one or more segments). Wildcards never match
/// the `user` segment at the start: other users' topics are granted by
/// naming them (`user.*`, `user.alice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub subscribe: Vec<Box<str>>,
    pub publish: Vec<Box<str>>,
}

impl Grants {
    /// Grants from pattern lists, `{sub}` replaced by `user`. A pattern
    /// that is not well formed is an error; one that names `{sub}` when
    /// there is no user, or whose user cannot be a topic segment, grants
    /// nothing and is left out.
    pub fn new(subscribe: &[String], publish: &[String], user: Option<&str>) -> Result<Grants, String> {
        let build = |list: &[String]| -> Result<Vec<Box<str>>, String> {
            let mut out = Vec::with_capacity(list.len());
            for pattern in list {
                let expanded = if pattern.contains("{sub}") {
                    match user.filter(|u| valid_segment(u.as_bytes())) {
                        Some(u) => pattern.replace("{sub}", u),
                        None => continue,
                    }
                } else {
                    pattern.clone()
                };
                check_pattern(&expanded)?;
                out.push(expanded.into_boxed_str());
            }
            Ok(out)
        };
        Ok(Grants {
            subscribe: build(subscribe)?,
            publish: build(publish)?,
        })
    }

    fn list(&self, action: Action) -> &[Box<str>] {
        match action {
            Action::Subscribe => &self.subscribe,
            Action::Publish => &self.publish,
        }
    }
}

/// A pattern is 1..=255 bytes of segments that are `*`, `>` (last only),
/// or topic bytes.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let bad = || Err(format!("topic pattern {pattern:?} is not well formed"));
    if pattern.is_empty() || pattern.len() > crate::topic::MAX_TOPIC_BYTES {
        return bad();
    }
    let segments: Vec<&str> = pattern.split('.').collect();
    for (i, s) in segments.iter().enumerate() {
        let ok = match *s {
            "*" => true,
            ">" => i == segments.len() - 1,
            s => valid_segment(s.as_bytes()),
        };
        if !ok {
            return bad();
        }
    }
    Ok(())
}

use crate::topic::valid_segment;

/// Whether `pattern` matches `topic` (see `Grants`).
pub fn matches(pattern: &str, topic: &[u8]) -> bool {
    let mut topic_segments = topic.split(|&b| b == b'.');
    for (i, p) in pattern.split('.').enumerate() {
        match p {
            ">" => {
                return match topic_segments.next() {
                    Some(first) => !first.is_empty() && (i > 0 || first != USER_SEGMENT.as_bytes()),
                    None => false,
                };
            }
            _ => match topic_segments.next() {
                Some(t) if p == "*" => {
                    if t.is_empty() || (i == 0 && t == USER_SEGMENT.as_bytes()) {
                        return false;
                    }
                }
                Some(t) if t == p.as_bytes() => {}
                _ => return false,
            },
        }
    }
    topic_segments.next().is_none()
}

/// Whether `topic` is under `user.`.
pub fn is_user_topic(topic: &[u8]) -> bool {
    topic
        .strip_prefix(USER_SEGMENT.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'.')
}

/// `user.<user>` itself or a topic under it.
fn is_own_user_topic(topic: &[u8], user: &str) -> bool {
    let Some(rest) = topic
        .strip_prefix(USER_SEGMENT.as_bytes())
        .and_then(|r| r.strip_prefix(b"."))
        .and_then(|r| r.strip_prefix(user.as_bytes()))
    else {
        return false;
    };
    rest.is_empty() || rest[0] == b'.'
}

/// Who a session is: a token's user, or an anonymous session of an
/// `optional` route. Sessions of `none` routes have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's subject; `None` for an anonymous session.
    pub user: Option<Box<str>>,
    /// When the token stops being valid, leeway included (Unix seconds):
    /// the session is closed with 4001 then, unless a fresh token came.
    pub expires_at: Option<u64>,
    pub grants: Arc<Grants>,
}

impl Identity {
    pub fn anonymous(grants: Arc<Grants>) -> Identity {
        Identity {
            user: None,
            expires_at: None,
            grants,
        }
    }

    /// Whether this session may do `action` on `topic`. A user may always
    /// subscribe to its own `user.<id>` topics.
    pub fn allows(&self, action: Action, topic: &[u8]) -> bool {
        if action == Action::Subscribe {
            if let Some(user) = &self.user {
                if valid_segment(user.as_bytes()) && is_own_user_topic(topic, user) {
                    return true;
                }
            }
        }
        self.grants.list(action).iter().any(|p| matches(p, topic))
    }
}

/// Whether a session may do `action` on `topic`: by its identity, or, on a
/// `none` route (no identity), on anything but another user's topic.
pub fn allows(identity: Option<&Identity>, action: Action, topic: &[u8]) -> bool {
    match identity {
        Some(id) => id.allows(action, topic),
        None => !is_user_topic(topic),
    }
}

/// Which key could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Secret(String),
    PublicKey(String),
}

/// The claims read from a token. Times are checked here, not by the
/// library, so that they are checked against the caller's clock. They are
/// NumericDates (RFC 7519 2): seconds, which may have a fraction.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    #[serde(default)]
    sluice: Permissions,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Permissions {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// The keys and rules tokens are checked with.
pub struct Verifier {
    /// Each key with the algorithms it may verify (RFC 8725 3.1: the
    /// algorithm is decided by the key, never by the token alone).
    keys: Vec<(DecodingKey, Vec<Algorithm>)>,
    leeway_secs: u64,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.iter().map(|(_, a)| a).collect::<Vec<_>>())
            .field("leeway_secs", &self.leeway_secs)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// Where a verifier's keys come from.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    /// HMAC secret (HS256, HS384, HS512).
    pub secret: Option<Vec<u8>>,
    /// PEM public key: RSA (RS256/384/512, PS256/384/512) or EC (ES256, ES384).
    pub public_key_pem: Option<Vec<u8>>,
}

impl Verifier {
    /// `None` when no key is configured.
    pub fn new(
        keys: KeySource,
        leeway_secs: u64,
        audience: Option<String>,
        issuer: Option<String>,
    ) -> Result<Option<Verifier>, KeyError> {
        let mut list = Vec::new();
        if let Some(secret) = keys.secret {
            // RFC 7518 3.2: a key of at least the hash's size.
            if secret.len() < 32 {
                return Err(KeyError::Secret(format!(
                    "the JWT secret has {} bytes; at least 32 are required",
                    secret.len()
                )));
            }
            list.push((
                DecodingKey::from_secret(&secret),
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            ));
        }
        if let Some(pem) = keys.public_key_pem {
            let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                let rsa = [
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ];
                (key, rsa.to_vec())
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (key, vec![Algorithm::ES256, Algorithm::ES384])
            } else {
                return Err(KeyError::PublicKey(
                    "the JWT public key is not an RSA or EC public key in PEM".into(),
                ));
            };
            list.push(key);
        }
        if list.is_empty() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            keys: list,
            leeway_secs,
            audience,
            issuer,
        }))
    }

    /// Checks `token` at `now` (Unix seconds): its signature with the key
    /// its algorithm belongs to, `exp` (required) and `nbf` (if present)
    /// with the leeway (RFC 7519 4.1.4, 4.1.5), `aud` and `iss` as
    /// configured, and a `sub`. Returns the session's identity.
    pub fn verify(&self, token: &[u8], now: u64) -> Result<Identity, Failure> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // A header that parses as JSON but names an algorithm the
            // library does not know (`none` among them).
            ErrorKind::Json(_) if header_names_an_algorithm(token) => Failure::WrongAlgorithm,
            _ => Failure::Malformed,
        })?;
        let (key, _) = self
            .keys
            .iter()
            .find(|(_, algs)| algs.contains(&header.alg))
            .ok_or(Failure::WrongAlgorithm)?;
        let mut rules = Validation::new(header.alg);
        rules.validate_exp = false;
        rules.validate_nbf = false;
        rules.required_spec_claims.clear();
        if let Some(aud) = &self.audience {
            rules.set_audience(&[aud]);
            rules.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            rules.set_issuer(&[iss]);
            rules.required_spec_claims.insert("iss".into());
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &rules)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => Failure::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                    Failure::WrongAlgorithm
                }
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => Failure::Malformed,
                _ => Failure::BadClaims,
            })?
            .claims;
        // Against whole seconds, a fraction goes the safe way: `exp` down
        // (RFC 7519 4.1.4: now must be before it), `nbf` up (4.1.5: now must
        // be at or after it).
        let seconds = |date: f64, round: fn(f64) -> f64| {
            // `as` saturates: a date past u64 is as good as never.
            (date.is_finite() && date >= 0.0)
                .then(|| round(date) as u64)
                .ok_or(Failure::BadClaims)
        };
        let exp = seconds(claims.exp.ok_or(Failure::BadClaims)?, f64::floor)?;
        let expires_at = exp.saturating_add(self.leeway_secs);
        if now >= expires_at {
            return Err(Failure::Expired);
        }
        let nbf = claims.nbf.map(|nbf| seconds(nbf, f64::ceil)).transpose()?;
        if nbf.is_some_and(|nbf| now.saturating_add(self.leeway_secs) < nbf) {
            return Err(Failure::NotYetValid);
        }
        let user = claims.sub.filter(|s| !s.is_empty()).ok_or(Failure::BadClaims)?;
        let grants = Grants::new(&claims.sluice.subscribe, &claims.sluice.publish, Some(&user))
            .map_err(|_| Failure::BadClaims)?;
        Ok(Identity {
            user: Some(user.into_boxed_str()),
            expires_at: Some(expires_at),
            grants: Arc::new(grants),
        })
    }
}

/// Whether a token's header is JSON with a string `alg`.
fn header_names_an_algorithm(token: &[u8]) -> bool {
    use base64::Engine;
    let Some(encoded) = token.split(|&b| b == b'.').next() else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded) else {
        return false;
    };
    #[derive(Deserialize)]
    struct Alg {
        #[allow(dead_code)]
        alg: String,
    }
    serde_json::from_slice::<Alg>(&json).is_ok()
}

/// The prefix of the `Sec-WebSocket-Protocol` entry that carries a token,
/// for browsers, which cannot set `Authorization` on a WebSocket.
pub const PROTOCOL_PREFIX: &[u8] = b"bearer.";

/// The token of a handshake: `Authorization: Bearer`, else an offered
/// subprotocol `bearer.<token>`, else the query's `token` parameter.
pub fn token_of<'a>(
    authorization: Option<&'a [u8]>,
    mut protocols: impl Iterator<Item = &'a [u8]>,
    query: Option<&'a str>,
) -> Option<&'a [u8]> {
    if let Some(value) = authorization {
        // RFC 6750 2.1; the scheme is case-insensitive (RFC 7235 2.1).
        return Some(match value.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
            _ => &[],
        });
    }
    if let Some(token) = protocols.find_map(|p| p.strip_prefix(PROTOCOL_PREFIX)) {
        return Some(token);
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(str::as_bytes)
}

/// The current time in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn verifier(leeway: u64) -> Verifier {
        let keys = KeySource {
            secret: Some(SECRET.to_vec()),
            public_key_pem: None,
        };
        Verifier::new(keys, leeway, None, None).unwrap().unwrap()
    }

    fn token(alg: Algorithm, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn each_outcome_of_a_token() {
        let v = verifier(30);
        let good = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "alice", "exp": NOW + 60, "sluice": {"subscribe": ["news.*"]}}),
        );
        let id = v.verify(good.as_bytes(), NOW).unwrap();
        assert_eq!(id.user.as_deref(), Some("alice"));
        assert_eq!(id.expires_at, Some(NOW + 90));
        assert_eq!(v.verify(b"not a token", NOW), Err(Failure::Malformed));
        assert_eq!(v.verify(b"a.b.c", NOW), Err(Failure::Malformed));
        let mut forged = good.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(v.verify(&forged, NOW), Err(Failure::BadSignature));
        // Expired: exp + leeway is the first refused second.
        assert!(v.verify(good.as_bytes(), NOW + 89).is_ok());
        assert_eq!(v.verify(good.as_bytes(), NOW + 90), Err(Failure::Expired));
        // Not yet valid: nbf - leeway is the first accepted second.
        let later = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "a", "exp": NOW + 600, "nbf": NOW + 100}),
        );
        assert_eq!(v.verify(later.as_bytes(), NOW + 69), Err(Failure::NotYetValid));
        assert!(v.verify(later.as_bytes(), NOW + 70).is_ok());
        // NumericDates may have a fraction (RFC 7519 2): against whole
        // seconds, exp counts as its second's start, nbf as the next one.
        let fractional = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "a", "exp": NOW as f64 + 600.5, "nbf": NOW as f64 + 100.25}),
        );
        assert_eq!(v.verify(fractional.as_bytes(), NOW + 70), Err(Failure::NotYetValid));
        assert!(v.verify(fractional.as_bytes(), NOW + 71).is_ok());
        assert!(v.verify(fractional.as_bytes(), NOW + 629).is_ok());
        assert_eq!(v.verify(fractional.as_bytes(), NOW + 630), Err(Failure::Expired));
        for bad in [
            serde_json::json!(-1.5),
            serde_json::json!("soon"),
            serde_json::json!(null),
        ] {
            let t = token(Algorithm::HS256, serde_json::json!({"sub": "a", "exp": bad}));
            assert_eq!(v.verify(t.as_bytes(), NOW), Err(Failure::BadClaims), "{bad}");
        }
        // No exp, no sub, a malformed grant: claims.
        let no_exp = token(Algorithm::HS256, serde_json::json!({"sub": "a"}));
        assert_eq!(v.verify(no_exp.as_bytes(), NOW), Err(Failure::BadClaims));
        let no_sub = token(Algorithm::HS256, serde_json::json!({"exp": NOW + 60}));
        assert_eq!(v.verify(no_sub.as_bytes(), NOW), Err(Failure::BadClaims));
        let bad_grant = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "a", "exp": NOW + 60, "sluice": {"publish": ["a.>.b"]}}),
        );
        assert_eq!(v.verify(bad_grant.as_bytes(), NOW), Err(Failure::BadClaims));
        // HS512 with the same secret is fine; an RSA algorithm is not
        // (no RSA key), nor is `none`.
        let hs512 = token(Algorithm::HS512, serde_json::json!({"sub": "a", "exp": NOW + 60}));
        assert!(v.verify(hs512.as_bytes(), NOW).is_ok());
        let rs = format!("eyJhbGciOiJSUzI1NiJ9.{}", good.split('.').nth(1).unwrap());
        assert_eq!(
            v.verify(format!("{rs}.AAAA").as_bytes(), NOW),
            Err(Failure::WrongAlgorithm)
        );
        let none = format!("eyJhbGciOiJub25lIn0.{}.", good.split('.').nth(1).unwrap());
        assert_eq!(v.verify(none.as_bytes(), NOW), Err(Failure::WrongAlgorithm));
    }

    #[test]
    fn short_secrets_and_bad_keys_are_refused_at_start() {
        let short = KeySource {
            secret: Some(vec![b'x'; 31]),
            public_key_pem: None,
        };
        assert!(matches!(Verifier::new(short, 0, None, None), Err(KeyError::Secret(_))));
        let junk = KeySource {
            secret: None,
            public_key_pem: Some(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec()),
        };
        assert!(matches!(
            Verifier::new(junk, 0, None, None),
            Err(KeyError::PublicKey(_))
        ));
        assert!(Verifier::new(KeySource::default(), 0, None, None).unwrap().is_none());
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let keys = KeySource {
            secret: Some(SECRET.to_vec()),
            public_key_pem: None,
        };
        let v = Verifier::new(keys, 0, Some("gw".into()), Some("idp".into()))
            .unwrap()
            .unwrap();
        let ok = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "a", "exp": NOW + 9, "aud": "gw", "iss": "idp"}),
        );
        assert!(v.verify(ok.as_bytes(), NOW).is_ok());
        for claims in [
            serde_json::json!({"sub": "a", "exp": NOW + 9, "aud": "other", "iss": "idp"}),
            serde_json::json!({"sub": "a", "exp": NOW + 9, "iss": "idp"}),
            serde_json::json!({"sub": "a", "exp": NOW + 9, "aud": "gw", "iss": "evil"}),
        ] {
            let t = token(Algorithm::HS256, claims);
            assert_eq!(v.verify(t.as_bytes(), NOW), Err(Failure::BadClaims));
        }
    }

    #[test]
    fn patterns_match_by_segment_and_never_open_user_topics() {
        assert!(matches("news.*", b"news.sport"));
        assert!(!matches("news.*", b"news"));
        assert!(!matches("news.*", b"news.sport.live"));
        assert!(!matches("news.*", b"news."));
        assert!(matches("news.>", b"news.sport.live"));
        assert!(!matches("news.>", b"news"));
        assert!(!matches("news.>", b"news."));
        assert!(matches("news", b"news"));
        assert!(!matches("news", b"newsy"));
        assert!(matches("*.x", b"a.x"));
        assert!(matches(">", b"anything.at.all"));
        // Wildcards at the start never reach user topics ...
        assert!(!matches(">", b"user.bob"));
        assert!(!matches("*.bob", b"user.bob"));
        // ... naming them does.
        assert!(matches("user.*", b"user.bob"));
        assert!(matches("user.>", b"user.bob.inbox"));
        for bad in ["", "a..b", "a.>.b", "a b", "a.*x"] {
            assert!(check_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_user_subscribes_to_its_own_topics_and_no_other_user_s() {
        let grants = Grants::new(
            &["chat.*".into()],
            &["chat.*".into(), "user.{sub}.outbox".into()],
            Some("alice"),
        )
        .unwrap();
        let alice = Identity {
            user: Some("alice".into()),
            expires_at: None,
            grants: Arc::new(grants),
        };
        assert!(alice.allows(Action::Subscribe, b"user.alice"));
        assert!(alice.allows(Action::Subscribe, b"user.alice.inbox"));
        assert!(!alice.allows(Action::Subscribe, b"user.alicex"));
        assert!(!alice.allows(Action::Subscribe, b"user.bob"));
        assert!(!alice.allows(Action::Publish, b"user.bob"));
        assert!(!alice.allows(Action::Publish, b"user.alice"));
        assert!(alice.allows(Action::Publish, b"user.alice.outbox"));
        assert!(alice.allows(Action::Publish, b"chat.room"));
        assert!(!alice.allows(Action::Publish, b"news.x"));
        // A user that cannot be a segment has no user topic, and `{sub}`
        // patterns grant it nothing.
        let dotted = Grants::new(&["user.{sub}".into()], &[], Some("a.b")).unwrap();
        assert!(dotted.subscribe.is_empty());
        // No identity (a `none` route): all but user topics.
        assert!(allows(None, Action::Publish, b"news"));
        assert!(!allows(None, Action::Subscribe, b"user.alice"));
        assert!(!allows(None, Action::Subscribe, b"user"));
        assert!(allows(None, Action::Subscribe, b"users"));
    }

    #[test]
    fn the_token_comes_from_the_header_a_subprotocol_or_the_query() {
        let none = std::iter::empty();
        assert_eq!(token_of(Some(b"Bearer abc"), none, None), Some(&b"abc"[..]));
        assert_eq!(
            token_of(Some(b"bearer  abc "), std::iter::empty(), None),
            Some(&b"abc"[..])
        );
        // Another scheme: an empty (malformed) token, not a fallback.
        assert_eq!(
            token_of(Some(b"Basic abc"), std::iter::empty(), Some("token=x")),
            Some(&b""[..])
        );
        let offered = [&b"sluice"[..], b"bearer.x.y.z"];
        assert_eq!(
            token_of(None, offered.into_iter(), Some("token=q")),
            Some(&b"x.y.z"[..])
        );
        assert_eq!(token_of(None, std::iter::empty(), Some("a=1&token=q")), Some(&b"q"[..]));
        assert_eq!(token_of(None, std::iter::empty(), Some("a=1")), None);
    }
}
