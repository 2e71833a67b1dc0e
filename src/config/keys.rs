//! Where key files come from. At a start espip reads them from disk, as root, with the
//! checks of [`super::peer::read_key_file`]. At a reload the daemon may have dropped its
//! privileges and cannot read root's files: `espip reload` (root) reads them with the same
//! checks, records what it read, and sends it over the control socket, where the daemon
//! parses the configuration with exactly those contents ([`KeyFiles::given`]).

use super::{invalid, ConfigError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The source of key file contents for one parse.
pub struct KeyFiles {
    given: Option<HashMap<PathBuf, Zeroizing<String>>>,
    read: RefCell<Vec<(PathBuf, Zeroizing<String>)>>,
}

impl KeyFiles {
    /// Read key files from disk (and remember what was read).
    pub fn disk() -> KeyFiles {
        KeyFiles {
            given: None,
            read: RefCell::new(Vec::new()),
        }
    }

    /// Use these contents, by path as the configuration names it (resolved against its
    /// directory); a file not among them is an error.
    pub fn given(files: HashMap<PathBuf, Zeroizing<String>>) -> KeyFiles {
        KeyFiles {
            given: Some(files),
            read: RefCell::new(Vec::new()),
        }
    }

    pub(super) fn read(&self, fkey: &str, path: &Path) -> Result<Zeroizing<String>, ConfigError> {
        let text = match &self.given {
            Some(files) => files.get(path).cloned().ok_or_else(|| {
                invalid(
                    fkey,
                    path.display(),
                    "a key file `espip reload` read and sent (it was not among them)",
                )
            })?,
            None => super::peer::read_key_file(fkey, path)?,
        };
        self.read
            .borrow_mut()
            .push((path.to_path_buf(), text.clone()));
        Ok(text)
    }

    /// Every key file read, with its contents.
    pub fn into_read(self) -> Vec<(PathBuf, Zeroizing<String>)> {
        self.read.into_inner()
    }
}
