//! JWT-SVIDs (`jsonwebtoken`, ES256; no crypto written here): signed with the node's P-256 JWT
//! key, kept in `--state-dir` (`workload-jwt-key.pem`, 0600) and published as a JWKS
//! (`use: jwt-svid`). Claims: `sub` (the SPIFFE ID), `aud`, `iat`, `exp` (`--jwt-ttl-secs`,
//! 5 min), `corral_session`, and `corral_grants` (the ids of the grants active for the
//! session when it was issued, if any), so a service can require that a person approved.

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
