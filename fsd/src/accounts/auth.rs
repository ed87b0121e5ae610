//! Password checks: argon2id hashing and verification on the blocking pool, and the dummy hash
//! that an unknown user is checked against, so that timing does not tell whether a user exists.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot hash the password: {0}")]
    Hash(argon2::password_hash::Error),
}

/// Hashes with the configured parameters and verifies against PHC strings.
#[derive(Clone)]
pub struct Hasher {
    params: Params,
    /// A hash of a random password with the configured parameters: verifying an unknown user
    /// against it costs what verifying a real one costs.
    dummy: String,
}

impl Hasher {
    /// A hasher with these parameters; computes the dummy hash (one argon2 run).
    ///
    /// # Errors
    /// [`HashError`] when argon2 refuses the parameters.
    pub fn new(params: Params) -> Result<Hasher, HashError> {
        let random: [u8; 32] = rand::random();
        let dummy = hash_password(&params, &String::from_utf8_lossy(&random))?;
        Ok(Hasher { params, dummy })
    }

    /// A new PHC string for `password` (fresh random salt).
    ///
    /// # Errors
    /// [`HashError`] from argon2.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        hash_password(&self.params, password)
    }

    /// Whether `password` matches `phc`; `None` (unknown user) is checked against the dummy hash
    /// and is always false. Blocking: call through [`Hasher::verify_async`] from async code.
    pub fn verify(&self, phc: Option<&str>, password: &str) -> bool {
        let (hash, known) = match phc {
            Some(p) => (p, true),
            None => (self.dummy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        // The parameters stored in the PHC string are used, so old hashes keep working after
        // the configured costs change. argon2's verification compares in constant time.
        let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        ok && known
    }

    /// [`Hasher::verify`] on the blocking pool (argon2 takes tens of milliseconds of CPU).
    pub async fn verify_async(&self, phc: Option<String>, password: String) -> bool {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.verify(phc.as_deref(), &password)).await.unwrap_or(false)
    }
}

/// A new PHC string for `password` with `params` and a fresh random salt.
///
/// # Errors
/// [`HashError`] from argon2.
pub fn hash_password(params: &Params, password: &str) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(HashError::Hash)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    argon.hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(HashError::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = Hasher::new(Params::new(1024, 1, 1, None).unwrap()).unwrap();
        let phc = h.hash("secret").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
        assert!(h.verify(Some(&phc), "secret"));
        assert!(!h.verify(Some(&phc), "Secret"));
        assert!(!h.verify(None, "secret"));
        assert!(!h.verify(Some("garbage"), "secret"));
    }
}
