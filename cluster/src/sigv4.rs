//! Verifying AWS Signature Version 4 (`Authorization: AWS4-HMAC-SHA256
//! Credential=…, SignedHeaders=…, Signature=…`) as AWS services do: the
//! server rebuilds the canonical request from what it received, signs it
//! with the secret of the access key named, and compares.

use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's time may be from ours (AWS allows 15 minutes).
pub const MAX_SKEW_SECS: i64 = 15 * 60;

/// Everything but the unreserved characters, as SigV4 encodes.
const STRICT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// The same, keeping `/` (paths).
const PATH: &AsciiSet = &STRICT.remove(b'/');

/// A received request, as it came over the wire.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent (still percent-encoded).
    pub path: &'a str,
    /// The query string as sent, without `?`.
    pub query: &'a str,
    /// Header names and values, any case, repeats allowed.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Who signed a request that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub access_key: String,
    pub region: String,
    pub service: String,
}

/// Why a request is refused; each maps to AWS's error code for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Missing Authentication Token")]
    Missing,
    #[error("{0}")]
    Incomplete(String),
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    #[error("The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.")]
    Mismatch,
    #[error("Signature expired: {0} is outside the allowed skew of 15 minutes from {1}")]
    Expired(String, String),
    /// `UNSIGNED-PAYLOAD`, a `STREAMING-*` mode or anything else that is
    /// not a SHA-256: Lambda's clients sign the payload, so must everyone.
    #[error("x-amz-content-sha256 must be the hex SHA-256 of the payload: unsigned and streaming payloads are not accepted")]
    UnsignedPayload,
}

impl AuthError {
    /// The `x-amzn-ErrorType` AWS answers with.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationTokenException",
            AuthError::Incomplete(_) => "IncompleteSignatureException",
            AuthError::UnknownKey => "UnrecognizedClientException",
            AuthError::Mismatch | AuthError::Expired(..) | AuthError::UnsignedPayload => {
                "InvalidSignatureException"
            }
        }
    }
}

#[derive(Debug)]
struct Authorization<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(v: &str) -> Result<Authorization<'_>, AuthError> {
    let incomplete = |m: &str| AuthError::Incomplete(m.to_string());
    let rest = v.strip_prefix(ALGORITHM).ok_or_else(|| {
        incomplete("Authorization header requires the AWS4-HMAC-SHA256 algorithm")
    })?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            cred = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            sig = Some(v);
        }
    }
    let (Some(cred), Some(signed), Some(signature)) = (cred, signed, sig) else {
        return Err(incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'",
        ));
    };
    let c: Vec<&str> = cred.split('/').collect();
    let [access_key, date, region, service, "aws4_request"] = c.as_slice() else {
        return Err(incomplete(
            "Credential must be ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
        ));
    };
    Ok(Authorization {
        access_key,
        date,
        region,
        service,
        signed_headers: signed.split(';').collect(),
        signature,
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Trimmed, inner runs of spaces collapsed; repeats joined with commas.
fn canonical_header_value(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(",")
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let enc = |s: &str| {
                let plus = s.replace('+', " ");
                let raw = percent_decode_str(&plus).decode_utf8_lossy().into_owned();
                utf8_percent_encode(&raw, STRICT).to_string()
            };
            (enc(k), enc(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// The signature of `string_to_sign` under the secret and scope.
pub fn sign(secret: &str, date: &str, region: &str, service: &str, string_to_sign: &str) -> String {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    let k = hmac(&k, b"aws4_request");
    hex::encode(hmac(&k, string_to_sign.as_bytes()))
}

/// The canonical request of `req` over `signed_headers`, ending in
/// `payload` (the hex SHA-256 of the body, or the hash the client claims).
fn canonical_request(req: &Request<'_>, signed_headers: &[&str], payload: &str) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let mut s = String::new();
    s += &req.method.to_ascii_uppercase();
    s += "\n";
    s += &utf8_percent_encode(path, PATH).to_string();
    s += "\n";
    s += &canonical_query(req.query);
    s += "\n";
    for h in signed_headers {
        s += &format!("{h}:{}\n", canonical_header_value(req.headers, h));
    }
    s += "\n";
    s += &signed_headers.join(";");
    s += "\n";
    s += payload;
    s
}

/// Signs a request as a client does (what [`verify`] checks): returns the
/// `X-Amz-Date` and `Authorization` headers to add. `req.headers` must
/// hold `host` and every other header to sign.
pub fn sign_request(
    req: &Request<'_>,
    access_key: &str,
    secret: &str,
    region: &str,
    service: &str,
    now: jiff::Timestamp,
) -> Vec<(String, String)> {
    let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let date = &amz_date[..8];
    let mut headers = req.headers.to_vec();
    headers.push(("x-amz-date".into(), amz_date.clone()));
    let mut signed: Vec<String> = headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    signed.sort();
    signed.dedup();
    let signed: Vec<&str> = signed.iter().map(String::as_str).collect();
    let payload = match header(&headers, "x-amz-content-sha256") {
        Some(h) => h.to_string(),
        None => hex::encode(Sha256::digest(req.body)),
    };
    let canonical = canonical_request(
        &Request {
            headers: &headers,
            ..*req
        },
        &signed,
        &payload,
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let sig = sign(secret, date, region, service, &to_sign);
    vec![
        ("X-Amz-Date".into(), amz_date),
        (
            "Authorization".into(),
            format!(
                "{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={}, Signature={sig}",
                signed.join(";")
            ),
        ),
    ]
}

/// What a request's headers alone establish, checked before its body is
/// read ([`check_headers`]): a well-formed `Authorization`, a date within
/// the allowed skew, and a payload hash that is a hash if one is claimed.
#[derive(Debug)]
pub struct Preverified<'a> {
    auth: Authorization<'a>,
    amz_date: &'a str,
    signed_at: jiff::Timestamp,
    claimed_hash: Option<&'a str>,
}

impl Preverified<'_> {
    /// The access key the request names (not yet known to exist).
    pub fn access_key(&self) -> &str {
        self.auth.access_key
    }

    /// The signature as sent (hex).
    pub fn signature(&self) -> &str {
        self.auth.signature
    }

    /// The time the client signed at (`X-Amz-Date`).
    pub fn signed_at(&self) -> jiff::Timestamp {
        self.signed_at
    }

    /// The payload's SHA-256 as the client declared it
    /// (`x-amz-content-sha256`), lower-case hex; None when not declared
    /// (Lambda's SDKs do not send it: the signature then covers the hash
    /// of the body, known only once it is read).
    pub fn claimed_hash(&self) -> Option<&str> {
        self.claimed_hash
    }
}

/// Checks everything of a request that needs no body and no secret.
pub fn check_headers(
    headers: &[(String, String)],
    now: jiff::Timestamp,
) -> Result<Preverified<'_>, AuthError> {
    let auth = header(headers, "authorization").ok_or(AuthError::Missing)?;
    let a = parse_authorization(auth)?;
    if !a.signed_headers.contains(&"host") {
        return Err(AuthError::Incomplete(
            "'Host' must be a signed header".into(),
        ));
    }
    let mut sorted = a.signed_headers.clone();
    sorted.sort_unstable();
    if sorted != a.signed_headers
        || a.signed_headers
            .iter()
            .any(|h| *h != h.to_ascii_lowercase())
    {
        return Err(AuthError::Incomplete(
            "SignedHeaders must be lower-case and sorted".into(),
        ));
    }
    let amz_date = header(headers, "x-amz-date")
        .ok_or_else(|| AuthError::Incomplete("missing X-Amz-Date".into()))?;
    let when = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", amz_date)
        .ok()
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| AuthError::Incomplete(format!("invalid X-Amz-Date {amz_date:?}")))?;
    if !amz_date.starts_with(a.date) || a.date.len() != 8 {
        return Err(AuthError::Incomplete(
            "the credential date does not match X-Amz-Date".into(),
        ));
    }
    if (now.as_second() - when.as_second()).abs() > MAX_SKEW_SECS {
        return Err(AuthError::Expired(amz_date.to_string(), now.to_string()));
    }
    let claimed_hash = match header(headers, "x-amz-content-sha256") {
        None => None,
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h),
        Some(_) => return Err(AuthError::UnsignedPayload),
    };
    Ok(Preverified {
        auth: a,
        amz_date,
        signed_at: when,
        claimed_hash,
    })
}

/// Checks the signature of `req` (headers as in [`check_headers`], the
/// body unused) over a canonical request ending in `payload_hash`, under
/// `secret`. With a claimed hash this runs before the body is read; the
/// body must then be checked against the claim.
pub fn verify_signature(
    req: &Request<'_>,
    pre: &Preverified<'_>,
    payload_hash: &str,
    secret: &str,
) -> Result<Signer, AuthError> {
    let a = &pre.auth;
    let canonical = canonical_request(req, &a.signed_headers, payload_hash);
    let scope = format!("{}/{}/{}/aws4_request", a.date, a.region, a.service);
    let to_sign = format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        pre.amz_date,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let expected = sign(secret, a.date, a.region, a.service, &to_sign);
    if expected.as_bytes().ct_eq(a.signature.as_bytes()).into() {
        Ok(Signer {
            access_key: a.access_key.to_string(),
            region: a.region.to_string(),
            service: a.service.to_string(),
        })
    } else {
        Err(AuthError::Mismatch)
    }
}

/// Whether `body` is what `claimed` (hex SHA-256, any case) says.
pub fn body_matches(claimed: &str, body_sha256: &[u8]) -> bool {
    hex::decode(claimed).is_ok_and(|c| bool::from(c.as_slice().ct_eq(body_sha256)))
}

/// Checks `req`'s signature, body included. `secret_for` gives the secret
/// of an access key (None: unknown key); `now` is the server's clock.
pub fn verify(
    req: &Request<'_>,
    now: jiff::Timestamp,
    secret_for: impl FnOnce(&str) -> Option<String>,
) -> Result<Signer, AuthError> {
    let pre = check_headers(req.headers, now)?;
    let body_hash = Sha256::digest(req.body);
    // A declared payload hash must be the body's, or the body could be
    // swapped under a valid signature.
    if let Some(h) = pre.claimed_hash() {
        if !body_matches(h, &body_hash) {
            return Err(AuthError::Mismatch);
        }
    }
    let secret = secret_for(pre.access_key()).ok_or(AuthError::UnknownKey)?;
    verify_signature(req, &pre, &hex::encode(body_hash), &secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `req`'s headers and the ones that sign it (as AKIDX with SECRET, at
    /// `now`).
    fn signed_headers(req: &Request<'_>, now: jiff::Timestamp) -> Vec<(String, String)> {
        let mut headers = req.headers.to_vec();
        headers.extend(sign_request(
            req,
            "AKIDX",
            SECRET,
            "us-east-1",
            "lambda",
            now,
        ));
        headers
    }

    /// AWS's published example: IAM ListUsers, signed on 2015-08-30.
    #[test]
    fn aws_documentation_example() {
        let headers = h(&[
            ("Host", "iam.amazonaws.com"),
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("X-Amz-Date", "20150830T123600Z"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, \
                 Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            ),
        ]);
        let req = Request {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            body: b"",
        };
        let now: jiff::Timestamp = "2015-08-30T12:40:00Z".parse().unwrap();
        let who = verify(&req, now, |k| (k == "AKIDEXAMPLE").then(|| SECRET.into())).unwrap();
        assert_eq!(who.access_key, "AKIDEXAMPLE");
        assert_eq!(
            (who.region.as_str(), who.service.as_str()),
            ("us-east-1", "iam")
        );
        // Wrong secret, unknown key, stale clock, tampered query.
        assert_eq!(
            verify(&req, now, |_| Some("x".into())),
            Err(AuthError::Mismatch)
        );
        assert_eq!(verify(&req, now, |_| None), Err(AuthError::UnknownKey));
        let later: jiff::Timestamp = "2015-08-30T13:00:00Z".parse().unwrap();
        assert!(matches!(
            verify(&req, later, |_| Some(SECRET.into())),
            Err(AuthError::Expired(..))
        ));
        let tampered = Request {
            query: "Action=DeleteUsers&Version=2010-05-08",
            ..req
        };
        assert_eq!(
            verify(&tampered, now, |_| Some(SECRET.into())),
            Err(AuthError::Mismatch)
        );
    }

    #[test]
    fn malformed_authorization() {
        let now = jiff::Timestamp::now();
        for (auth, want) in [
            (None, "MissingAuthenticationTokenException"),
            (Some("Basic dXNlcjpwYXNz"), "IncompleteSignatureException"),
            (Some("AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/iam/aws4_request"), "IncompleteSignatureException"),
            (Some("AWS4-HMAC-SHA256 Credential=A/x, SignedHeaders=host, Signature=00"), "IncompleteSignatureException"),
            (Some("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=x-amz-date, Signature=00"), "IncompleteSignatureException"),
        ] {
            let mut headers = h(&[("Host", "h"), ("X-Amz-Date", "20150830T123600Z")]);
            if let Some(a) = auth {
                headers.push(("Authorization".into(), a.into()));
            }
            let req = Request { method: "GET", path: "/", query: "", headers: &headers, body: b"" };
            let e = verify(&req, now, |_| Some(SECRET.into())).unwrap_err();
            assert_eq!(e.code(), want, "{auth:?}: {e}");
        }
    }

    #[test]
    fn a_declared_payload_hash_must_match_the_body() {
        let headers = h(&[
            ("Host", "h"),
            ("X-Amz-Date", "20150830T123600Z"),
            ("X-Amz-Content-Sha256", &hex::encode(Sha256::digest(b"original"))),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=00"),
        ]);
        let req = Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: b"swapped",
        };
        let now: jiff::Timestamp = "2015-08-30T12:36:00Z".parse().unwrap();
        assert_eq!(
            verify(&req, now, |_| Some(SECRET.into())),
            Err(AuthError::Mismatch)
        );
    }

    /// Lambda's clients sign their payload: `UNSIGNED-PAYLOAD`, streaming
    /// modes and anything that is not a SHA-256 are refused, even under a
    /// signature that is otherwise right.
    #[test]
    fn unsigned_and_streaming_payloads_are_refused() {
        let now = jiff::Timestamp::now();
        for mode in [
            "UNSIGNED-PAYLOAD",
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "abc",
            &"g".repeat(64),
        ] {
            let base = h(&[("Host", "h"), ("X-Amz-Content-Sha256", mode)]);
            let req = Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &base,
                body: b"{}",
            };
            let headers = signed_headers(&req, now);
            let signed = Request {
                headers: &headers,
                ..req
            };
            assert_eq!(
                verify(&signed, now, |_| Some(SECRET.into())),
                Err(AuthError::UnsignedPayload),
                "{mode}"
            );
            assert_eq!(
                AuthError::UnsignedPayload.code(),
                "InvalidSignatureException"
            );
        }
    }

    /// With a claimed payload hash, the signature is checked from the
    /// headers alone (before the body), and the body against the claim.
    #[test]
    fn a_claimed_hash_is_verified_before_the_body() {
        let now = jiff::Timestamp::now();
        let body = b"{\"a\": 1}";
        let claim = hex::encode(Sha256::digest(body));
        let base = h(&[("Host", "h"), ("X-Amz-Content-Sha256", &claim)]);
        let req = Request {
            method: "POST",
            path: "/2015-03-31/functions/f/invocations",
            query: "",
            headers: &base,
            body,
        };
        let headers = signed_headers(&req, now);
        let pre = check_headers(&headers, now).unwrap();
        assert_eq!(pre.claimed_hash(), Some(claim.as_str()));
        assert_eq!(pre.access_key(), "AKIDX");
        let no_body = Request {
            headers: &headers,
            body: b"",
            ..req
        };
        assert!(verify_signature(&no_body, &pre, &claim, SECRET).is_ok());
        assert_eq!(
            verify_signature(&no_body, &pre, &claim, "wrong"),
            Err(AuthError::Mismatch)
        );
        assert!(body_matches(&claim, &Sha256::digest(body)));
        assert!(body_matches(&claim.to_uppercase(), &Sha256::digest(body)));
        assert!(!body_matches(&claim, &Sha256::digest(b"{}")));
        // Without a claim, the headers alone do not decide.
        let plain = h(&[("Host", "h")]);
        let headers = signed_headers(
            &Request {
                headers: &plain,
                ..req
            },
            now,
        );
        assert_eq!(check_headers(&headers, now).unwrap().claimed_hash(), None);
    }

    #[test]
    fn what_sign_request_signs_verifies() {
        let base = h(&[
            ("Host", "127.0.0.1:9000"),
            ("Content-Type", "application/json"),
        ]);
        let req = Request {
            method: "POST",
            path: "/2015-03-31/functions/f/invocations",
            query: "Qualifier=%24LATEST",
            headers: &base,
            body: b"{}",
        };
        let now = jiff::Timestamp::now();
        let headers = signed_headers(&req, now);
        let signed = Request {
            headers: &headers,
            ..req
        };
        let who = verify(&signed, now, |_| Some(SECRET.into())).unwrap();
        assert_eq!(who.access_key, "AKIDX");
        let tampered = Request {
            body: b"{\"x\":1}",
            ..signed
        };
        assert_eq!(
            verify(&tampered, now, |_| Some(SECRET.into())),
            Err(AuthError::Mismatch)
        );
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(
            canonical_query("b=2&a=%24LATEST&a=1"),
            "a=%24LATEST&a=1&b=2"
        );
        assert_eq!(canonical_query("Qualifier=$LATEST"), "Qualifier=%24LATEST");
        assert_eq!(
            utf8_percent_encode("/2015-03-31/functions/arn%3Aaws/invocations", PATH).to_string(),
            "/2015-03-31/functions/arn%253Aaws/invocations"
        );
        let hs = h(&[("X-A", "  a   b  "), ("x-a", "c")]);
        assert_eq!(canonical_header_value(&hs, "x-a"), "a b,c");
    }
}
