//! The callback signing key kept in the data directory: generated once (256
//! bits from the OS) when `serve` is given no `--signing-key`, so callbacks
//! are always signed, and shown by `sagamq signing-key --data DIR` for the
//! subscribers' configuration.
//!
//! **Invariants:** the key is created only by the process holding the data
//! directory's lock (so two processes never generate two keys), atomically
//! (temporary file, fsync, rename, directory fsync: a crash leaves no key or
//! the whole key), readable by its owner only; a damaged key file is refused,
//! never silently replaced (subscribers hold the old key).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File name of the key inside the data directory.
pub const SIGNING_KEY_FILE_NAME: &str = "signing.key";
const SIGNING_KEY_TEMP_FILE_NAME: &str = "signing.key.tmp";
/// Random bytes in a generated key (hex-encoded in the file and as the HMAC key).
const SIGNING_KEY_BYTES: usize = 32;

pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(SIGNING_KEY_FILE_NAME)
}

/// The key in `dir`, if one was generated. Its text (64 hex digits) is the
/// HMAC key, byte for byte, as subscribers configure it.
pub fn load(dir: &Path) -> Result<Option<String>, String> {
    let path = key_path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read the signing key {}: {e}", path.display())),
    };
    let key = text.trim();
    if key.len() != 2 * SIGNING_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the signing key file {} is damaged (expected {} hex digits); subscribers verify with the key it held, \
             so it is not replaced automatically: restore it, or delete it to generate a new one and give \
             subscribers the new key (sagamq signing-key)",
            path.display(),
            2 * SIGNING_KEY_BYTES
        ));
    }
    Ok(Some(key.to_string()))
}

/// The key in `dir`, generated first if there is none. The caller must hold
/// the directory's lock.
pub fn load_or_create(dir: &Path) -> Result<String, String> {
    if let Some(k) = load(dir)? {
        return Ok(k);
    }
    let mut raw = [0u8; SIGNING_KEY_BYTES];
    getrandom::fill(&mut raw).map_err(|e| format!("no OS randomness for a signing key: {e}"))?;
    let key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_atomically(dir, &key).map_err(|e| format!("write the signing key {}: {e}", key_path(dir).display()))?;
    tracing::info!(path = %key_path(dir).display(), "generated a callback signing key (show it with `sagamq signing-key`)");
    Ok(key)
}

fn write_atomically(dir: &Path, key: &str) -> io::Result<()> {
    let tmp = dir.join(SIGNING_KEY_TEMP_FILE_NAME);
    let _ = fs::remove_file(&tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(format!("{key}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, key_path(dir))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_kept_private_and_a_damaged_file_is_refused() {
        let d = std::env::temp_dir().join(format!("sagamq-signing-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        assert_eq!(load(&d).unwrap(), None);
        let k = load_or_create(&d).unwrap();
        assert_eq!(k.len(), 64);
        assert_eq!(load_or_create(&d).unwrap(), k, "kept, not regenerated");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(key_path(&d)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
        fs::write(key_path(&d), "short\n").unwrap();
        let err = load_or_create(&d).unwrap_err();
        assert!(err.contains("damaged"), "{err}");
        assert_eq!(fs::read_to_string(key_path(&d)).unwrap(), "short\n", "left as found");
        fs::remove_dir_all(&d).unwrap();
    }
}
