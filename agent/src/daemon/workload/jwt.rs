//! JWT-SVIDs (`jsonwebtoken`, ES256; no crypto written here): signed with the node's P-256 JWT
//! key, kept in `--state-dir` (`workload-jwt-key.pem`, 0600) and published as a JWKS
//! (`use: jwt-svid`). Claims: `sub` (the SPIFFE ID), `aud`, `iat`, `exp` (`--jwt-ttl-secs`,
//! 5 min), `corral_session`, and `corral_grants` (the ids of the grants active for the
//! session when it was issued, if any), so a service can require that a person approved.
//!
//! Signing goes through `ring`'s P-256 ([`provider`]): jsonwebtoken's RustCrypto signer
//! re-derives the public key from the PKCS#8 document for every token and signs in portable
//! code, which made a JWT-SVID cost about 2.7 times an X.509-SVID here (`cargo xtask bench
//! spiffe`). Verification and the JWK helpers stay RustCrypto's.

use std::{path::Path, time::Duration};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    jwk::{Jwk, JwkSet, PublicKeyUse},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: Vec<String>,
    pub iat: u64,
    pub exp: u64,
    pub corral_session: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corral_grants: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the workload JWT key {path}")]
    Key {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("sign a JWT-SVID")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("{0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

/// jsonwebtoken's process-wide crypto provider: ES256 signing by `ring`, everything else
/// RustCrypto's.
mod provider {
    use std::sync::{Arc, Mutex, PoisonError};

    use jsonwebtoken::{
        Algorithm, DecodingKey, EncodingKey,
        crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils, rust_crypto},
        errors::{ErrorKind, Result},
        signature,
    };
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

    /// ES256 (the fixed 64-byte r||s form JWS uses) with a parsed `ring` key.
    struct RingEs256(Arc<EcdsaKeyPair>);

    impl signature::Signer<Vec<u8>> for RingEs256 {
        fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
            self.0
                .sign(&ring::rand::SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new())
        }
    }

    impl JwtSigner for RingEs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::ES256
        }
    }

    /// The last key parsed (the node has one JWT key), so a token costs one signature.
    static PARSED: Mutex<Option<(Vec<u8>, Arc<EcdsaKeyPair>)>> = Mutex::new(None);

    fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        if *alg != Algorithm::ES256 {
            return (rust_crypto::DEFAULT_PROVIDER.signer_factory)(alg, key);
        }
        let mut parsed = PARSED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((der, pair)) = parsed.as_ref()
            && der.as_slice() == key.as_bytes()
        {
            return Ok(Box::new(RingEs256(pair.clone())));
        }
        let pair = Arc::new(
            EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                key.as_bytes(),
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        );
        *parsed = Some((key.as_bytes().to_vec(), pair.clone()));
        Ok(Box::new(RingEs256(pair)))
    }

    fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)
    }

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: KeyUtils {
            rsa_pub_components_from_private_key: |k| {
                (rust_crypto::DEFAULT_PROVIDER
                    .key_utils
                    .rsa_pub_components_from_private_key)(k)
            },
            rsa_pub_components_from_public_key: |k| {
                (rust_crypto::DEFAULT_PROVIDER
                    .key_utils
                    .rsa_pub_components_from_public_key)(k)
            },
            ec_pub_components_from_private_key: |k, a| {
                (rust_crypto::DEFAULT_PROVIDER
                    .key_utils
                    .ec_pub_components_from_private_key)(k, a)
            },
            ed_pub_components_from_private_key: |k, c| {
                (rust_crypto::DEFAULT_PROVIDER
                    .key_utils
                    .ed_pub_components_from_private_key)(k, c)
            },
            compute_digest: |d, h| (rust_crypto::DEFAULT_PROVIDER.key_utils.compute_digest)(d, h),
        },
    };

    /// Installs the provider once per process (a provider installed before stays: it then
    /// signs, as correctly, more slowly).
    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = PROVIDER.install_default();
        });
    }
}

pub struct JwtKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    /// The JWKS document, JSON.
    pub jwks: Vec<u8>,
}

impl JwtKey {
    /// Loads the key kept in `dir`, or makes one there.
    pub fn open(dir: &Path) -> Result<Self, JwtError> {
        provider::install();
        let path = dir.join("workload-jwt-key.pem");
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| JwtError::Key {
            path: path.clone(),
            source,
        };
        let key = if path.exists() {
            let pem = std::fs::read_to_string(&path).map_err(|e| fail(Box::new(e)))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| fail(Box::new(e)))?
        } else {
            std::fs::create_dir_all(dir).map_err(|e| fail(Box::new(e)))?;
            let k = rcgen::KeyPair::generate().map_err(|e| fail(Box::new(e)))?;
            super::ca::write_private(&path, &k.serialize_pem()).map_err(|e| fail(Box::new(e)))?;
            k
        };
        let encoding = EncodingKey::from_ec_der(&key.serialize_der());
        let mut jwk =
            Jwk::from_encoding_key(&encoding, Algorithm::ES256).map_err(|e| fail(Box::new(e)))?;
        // A key id from the public key (its first bytes, hex): stable across restarts.
        let kid: String = key.public_key_raw()[1..9]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Other("jwt-svid".into()));
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| fail(Box::new(e)))?;
        let jwks =
            serde_json::to_vec(&JwkSet { keys: vec![jwk] }).map_err(|e| fail(Box::new(e)))?;
        Ok(Self {
            encoding,
            decoding,
            kid,
            jwks,
        })
    }

    /// A JWT-SVID with `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, claims, &self.encoding).map_err(JwtError::Sign)
    }

    /// The claims of `token` if this node signed it, it is unexpired and `audience` is one of
    /// its audiences.
    pub fn validate(&self, token: &str, audience: &str) -> Result<Claims, JwtError> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        v.leeway = 0;
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(JwtError::Invalid)?
            .claims)
    }
}

/// Now, Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str) -> Claims {
        let iat = now_secs();
        Claims {
            sub: "spiffe://t.corral/agent/a".into(),
            aud: vec![aud.into()],
            iat,
            exp: iat + 60,
            corral_session: "s1".into(),
            corral_grants: vec!["7".into()],
        }
    }

    #[test]
    fn tokens_signed_through_ring_verify_with_the_published_key_and_only_as_issued() {
        let dir = std::env::temp_dir().join(format!("corral-jwt-test-{}", std::process::id()));
        let key = JwtKey::open(&dir).expect("key");
        let token = key.sign(&claims("svc")).expect("sign");
        // Verified by RustCrypto against the JWK this node publishes.
        let got = key.validate(&token, "svc").expect("valid");
        assert_eq!(got.corral_session, "s1");
        assert_eq!(got.corral_grants, ["7"]);
        // The JWKS holds that one key.
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&key.jwks).expect("jwks");
        let jwk = jwks.keys.first().expect("a key");
        let decoding = DecodingKey::from_jwk(jwk).expect("decoding key");
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["svc"]);
        assert!(jsonwebtoken::decode::<Claims>(&token, &decoding, &v).is_ok());
        // Another audience, another signature, another payload: refused.
        assert!(key.validate(&token, "other").is_err());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let other = key.sign(&claims("svc")).expect("sign");
        parts[2] = other.split('.').nth(2).expect("signature").to_owned();
        parts[1] = key
            .sign(&Claims {
                corral_session: "s2".into(),
                ..claims("svc")
            })
            .expect("sign")
            .split('.')
            .nth(1)
            .expect("payload")
            .to_owned();
        assert!(
            key.validate(&parts.join("."), "svc").is_err(),
            "a payload under another token's signature"
        );
        // The key is kept: reopened, it verifies what it signed before.
        let again = JwtKey::open(&dir).expect("reopen");
        assert!(again.validate(&token, "svc").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
