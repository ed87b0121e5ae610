//! Session tokens: stateless proofs of a login that survive a server restart.
//!
//! `token = base64url(len(user) || user || expiry || mac)`, with
//! `mac = blake3::keyed_hash(token_key, user || expiry || blake3(PHC string))`: a token is valid
//! only before its expiry, only while the user exists, and only while the password is unchanged
//! (a new password is a new PHC string). Nothing is stored on the server.

use base64::Engine as _;
use homefs_shared::Token;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The secret that signs tokens (32 bytes, the file `token.key`).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

/// Why a token was refused (for the log; the wire only says 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token of an unknown user")]
    UnknownUser,
    #[error("token does not match (password changed, or forged)")]
    BadMac,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> TokenKey {
        TokenKey(bytes)
    }

    /// Reads a key file, which must hold exactly 32 bytes.
    ///
    /// # Errors
    /// The read error, or `InvalidData` for a file of another length.
    pub fn load(path: &Path) -> io::Result<TokenKey> {
        let bytes = std::fs::read(path)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| io::Error::new(io::ErrorKind::InvalidData, format!("{} bytes, not 32", b.len())))?;
        Ok(TokenKey(key))
    }

    /// A token for `user`, valid until `expiry`, bound to the user's current PHC string.
    pub fn issue(&self, user: &str, expiry: SystemTime, phc: &str) -> Token {
        let expiry = unix_secs(expiry);
        let mac = self.mac(user, expiry, phc);
        let mut raw = Vec::with_capacity(1 + user.len() + 8 + 32);
        raw.push(user.len() as u8);
        raw.extend_from_slice(user.as_bytes());
        raw.extend_from_slice(&expiry.to_be_bytes());
        raw.extend_from_slice(mac.as_bytes());
        Token(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
    }

    /// The user a token names, before it is checked (to find their PHC string and to throttle).
    ///
    /// # Errors
    /// [`TokenError::Malformed`].
    pub fn claimed_user(token: &Token) -> Result<String, TokenError> {
        decode(token).map(|d| d.user)
    }

    /// Checks a token against the current time and the named user's current PHC string
    /// (`None`: the user does not exist). Returns the user.
    ///
    /// # Errors
    /// [`TokenError`], the reason for the log.
    pub fn verify(&self, token: &Token, now: SystemTime, phc: Option<&str>) -> Result<String, TokenError> {
        let d = decode(token)?;
        if unix_secs(now) >= d.expiry {
            return Err(TokenError::Expired);
        }
        let phc = phc.ok_or(TokenError::UnknownUser)?;
        // blake3::Hash's equality is constant-time.
        if self.mac(&d.user, d.expiry, phc) != blake3::Hash::from_bytes(d.mac) {
            return Err(TokenError::BadMac);
        }
        Ok(d.user)
    }

    fn mac(&self, user: &str, expiry: u64, phc: &str) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(user.as_bytes());
        h.update(&expiry.to_be_bytes());
        h.update(blake3::hash(phc.as_bytes()).as_bytes());
        h.finalize()
    }
}

struct Decoded {
    user: String,
    expiry: u64,
    mac: [u8; 32],
}

fn decode(token: &Token) -> Result<Decoded, TokenError> {
    // A token is short; refuse anything long before decoding it.
    if token.0.len() > 256 {
        return Err(TokenError::Malformed);
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token.0).map_err(|_| TokenError::Malformed)?;
    let (&len, rest) = raw.split_first().ok_or(TokenError::Malformed)?;
    let len = len as usize;
    if rest.len() != len + 8 + 32 {
        return Err(TokenError::Malformed);
    }
    let user = std::str::from_utf8(&rest[..len]).map_err(|_| TokenError::Malformed)?.to_string();
    let expiry = u64::from_be_bytes(rest[len..len + 8].try_into().map_err(|_| TokenError::Malformed)?);
    let mac: [u8; 32] = rest[len + 8..].try_into().map_err(|_| TokenError::Malformed)?;
    Ok(Decoded { user, expiry, mac })
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_until_expiry_and_bound_to_the_password() {
        let key = TokenKey::from_bytes([7; 32]);
        let now = SystemTime::now();
        let t = key.issue("alice", now + Duration::from_secs(60), "$argon2id$a");
        assert_eq!(TokenKey::claimed_user(&t), Ok("alice".into()));
        assert_eq!(key.verify(&t, now, Some("$argon2id$a")), Ok("alice".into()));
        assert_eq!(key.verify(&t, now + Duration::from_secs(61), Some("$argon2id$a")), Err(TokenError::Expired));
        assert_eq!(key.verify(&t, now, Some("$argon2id$b")), Err(TokenError::BadMac));
        assert_eq!(key.verify(&t, now, None), Err(TokenError::UnknownUser));
        let other = TokenKey::from_bytes([8; 32]);
        assert_eq!(other.verify(&t, now, Some("$argon2id$a")), Err(TokenError::BadMac));
        assert_eq!(key.verify(&Token("!!".into()), now, None), Err(TokenError::Malformed));
        assert_eq!(key.verify(&Token(String::new()), now, None), Err(TokenError::Malformed));
    }

    #[test]
    fn a_changed_user_name_breaks_the_mac() {
        let key = TokenKey::from_bytes([1; 32]);
        let now = SystemTime::now();
        let t = key.issue("bob", now + Duration::from_secs(60), "h");
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t.0).unwrap();
        raw[1] = b'c';
        let forged = Token(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        assert_eq!(key.verify(&forged, now, Some("h")), Err(TokenError::BadMac));
    }
}
