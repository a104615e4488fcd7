//! Client-side encryption of backups: the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway, Vizár) over AES-256-GCM from RustCrypto's `aead::stream`, with the
//! tenant's data key. The plaintext is cut into 64 KiB segments, each sealed
//! with a counter nonce and a last-segment flag, so truncation, reordering and
//! tampering are all detected, and memory stays at one segment whatever the
//! size of the dump.
//!
//! Object layout: `SILOBK01` (8 bytes) ‖ nonce prefix (7 bytes) ‖ segments,
//! each `min(64 KiB, rest) + 16` bytes. The backup id is every segment's
//! associated data, so one backup's object cannot pass for another's.

use aes_gcm::aead::stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use rand::RngCore;
use uuid::Uuid;

/// Plaintext bytes per sealed segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
const MAGIC: &[u8; 8] = b"SILOBK01";
const NONCE_PREFIX: usize = 7;
/// Bytes before the first segment.
pub const HEADER_LEN: usize = MAGIC.len() + NONCE_PREFIX;

/// Why sealed data could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("not a silo backup (unknown header)")]
    BadHeader,
    #[error(
        "the backup data failed authentication: it is corrupt, truncated or not this backup's"
    )]
    Corrupt,
}

/// A fresh random data key.
pub fn new_data_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

/// Encrypts a stream pushed through it piece by piece.
pub struct Sealer {
    enc: Option<EncryptorBE32<Aes256Gcm>>,
    aad: [u8; 16],
    pending: Vec<u8>,
}

impl Sealer {
    /// A sealer for backup `id`, and the header to store first.
    pub fn new(key: &[u8; 32], id: Uuid) -> (Self, Vec<u8>) {
        let mut prefix = [0u8; NONCE_PREFIX];
        rand::thread_rng().fill_bytes(&mut prefix);
        let aead = Aes256Gcm::new(key.into());
        let enc = EncryptorBE32::from_aead(aead, (&prefix).into());
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&prefix);
        (
            Self {
                enc: Some(enc),
                aad: *id.as_bytes(),
                pending: Vec::with_capacity(2 * SEGMENT),
            },
            header,
        )
    }

    /// Take `data`; append the ciphertext of every segment now complete to `out`.
    /// A full segment is held back until more data follows, since the last
    /// segment is sealed differently.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        let enc = self.enc.as_mut().expect("push after finish");
        let mut start = 0;
        while self.pending.len() - start > SEGMENT {
            let mut seg = self.pending[start..start + SEGMENT].to_vec();
            enc.encrypt_next_in_place(&self.aad, &mut seg)
                .expect("segment counter within 2^32 segments (256 TiB)");
            out.extend_from_slice(&seg);
            start += SEGMENT;
        }
        self.pending.drain(..start);
    }

    /// Seal the last segment into `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        let enc = self.enc.take().expect("finish once");
        let mut seg = std::mem::take(&mut self.pending);
        enc.encrypt_last_in_place(&self.aad, &mut seg)
            .expect("last segment seals");
        out.extend_from_slice(&seg);
    }
}

/// Decrypts a stream pushed through it piece by piece.
pub struct Opener {
    key: [u8; 32],
    dec: Option<DecryptorBE32<Aes256Gcm>>,
    aad: [u8; 16],
    pending: Vec<u8>,
}

impl Opener {
    pub fn new(key: &[u8; 32], id: Uuid) -> Self {
        Self {
            key: *key,
            dec: None,
            aad: *id.as_bytes(),
            pending: Vec::with_capacity(2 * (SEGMENT + TAG)),
        }
    }

    /// Take stored bytes; append the plaintext of every complete segment to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptError> {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        if self.dec.is_none() {
            if self.pending.len() < HEADER_LEN {
                return Ok(());
            }
            if &self.pending[..MAGIC.len()] != MAGIC {
                return Err(CryptError::BadHeader);
            }
            let prefix: [u8; NONCE_PREFIX] = self.pending[MAGIC.len()..HEADER_LEN]
                .try_into()
                .expect("prefix length");
            let aead = Aes256Gcm::new((&self.key).into());
            self.dec = Some(DecryptorBE32::from_aead(aead, (&prefix).into()));
            start = HEADER_LEN;
        }
        let dec = self.dec.as_mut().expect("header read");
        while self.pending.len() - start > SEGMENT + TAG {
            let mut seg = self.pending[start..start + SEGMENT + TAG].to_vec();
            dec.decrypt_next_in_place(&self.aad, &mut seg)
                .map_err(|_| CryptError::Corrupt)?;
            out.extend_from_slice(&seg);
            start += SEGMENT + TAG;
        }
        self.pending.drain(..start);
        Ok(())
    }

    /// Open the last segment into `out`; fails if the stream was cut short.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptError> {
        let dec = self.dec.take().ok_or(CryptError::BadHeader)?;
        let mut seg = std::mem::take(&mut self.pending);
        if seg.len() < TAG {
            return Err(CryptError::Corrupt);
        }
        dec.decrypt_last_in_place(&self.aad, &mut seg)
            .map_err(|_| CryptError::Corrupt)?;
        out.extend_from_slice(&seg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &[u8; 32], id: Uuid, data: &[u8], chunk: usize) -> Vec<u8> {
        let (mut s, mut out) = Sealer::new(key, id);
        for piece in data.chunks(chunk.max(1)) {
            s.push(piece, &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn open(key: &[u8; 32], id: Uuid, data: &[u8], chunk: usize) -> Result<Vec<u8>, CryptError> {
        let mut o = Opener::new(key, id);
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            o.push(piece, &mut out)?;
        }
        o.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_any_length_in_any_chunking() {
        let key = new_data_key();
        let id = Uuid::now_v7();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for chunk in [1000, SEGMENT, 100_000] {
                let sealed = seal(&key, id, &data, chunk);
                assert_eq!(
                    sealed.len(),
                    HEADER_LEN + len + TAG * len.div_ceil(SEGMENT).max(1)
                );
                assert_eq!(open(&key, id, &sealed, 7777).unwrap(), data, "len {len}");
            }
        }
    }

    #[test]
    fn tampering_truncation_and_the_wrong_key_or_backup_are_refused() {
        let key = new_data_key();
        let id = Uuid::now_v7();
        let data = vec![7u8; 2 * SEGMENT + 5];
        let sealed = seal(&key, id, &data, 4096);

        let mut flipped = sealed.clone();
        flipped[HEADER_LEN + SEGMENT + 3] ^= 1;
        assert!(matches!(
            open(&key, id, &flipped, 9000),
            Err(CryptError::Corrupt)
        ));

        // Cut at a segment boundary: the last segment flag catches it.
        let cut = &sealed[..HEADER_LEN + SEGMENT + TAG];
        assert!(open(&key, id, cut, 9000).is_err());
        assert!(open(&key, id, &sealed[..sealed.len() - 1], 9000).is_err());

        assert!(open(&new_data_key(), id, &sealed, 9000).is_err());
        assert!(open(&key, Uuid::now_v7(), &sealed, 9000).is_err());
        assert!(matches!(
            open(&key, id, b"not a backup at all", 9000),
            Err(CryptError::BadHeader)
        ));
    }
}
