//! Password and keyboard-interactive authentication, tried after the agent and key files as
//! OpenSSH does. The password comes from `--password-file` (which must be private to the
//! invoking user) or from a no-echo prompt on the terminal; never from an argument.
//!
//! A password that logged in is kept in memory (zeroed when dropped) for the life of the
//! process, so the pool's other connections and every reconnect use it without asking
//! again. It is never logged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use russh::client::{AuthResult, Handle, KeyboardInteractiveAuthResponse};
use thiserror::Error;
use tracing::debug;
use zeroize::Zeroizing;

use super::{Client, SshError, SshOptions, bounded, protocol};

/// Why a password file is refused.
#[derive(Debug, Error)]
pub enum PasswordFileError {
    /// It cannot be read.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// Group or others may read or write it.
    #[error("it is readable or writable by other users (mode {mode:o}): run `chmod 600` on it")]
    Exposed {
        /// The file's permission bits.
        mode: u32,
    },
    /// Someone other than the invoking user (or root) owns it.
    #[error(
        "it belongs to uid {owner}, not to you or root: `chown` it to yourself and `chmod 600` it"
    )]
    Owner {
        /// The owner's uid.
        owner: u32,
    },
    /// It holds no password.
    #[error("it is empty: write the password on its first line")]
    Empty,
}

/// What password authentication came to, when it did not fail outright.
pub(super) enum Outcome {
    /// The server accepted the password.
    LoggedIn,
    /// There was no password to try (no file and no terminal).
    NoPassword,
}

/// Reads the password from `path`: its first line, without the line end. The file must be
/// owned by `uid` or root and be private (no group or other permission bits). Windows has no
/// modes to check (see `mse_vpn_platform::account`).
pub fn read_file(path: &Path, uid: u32) -> Result<Zeroizing<String>, PasswordFileError> {
    let meta = std::fs::metadata(path).map_err(PasswordFileError::Read)?;
    if let Some((owner, mode)) = mse_vpn_platform::account::owner_and_mode(&meta) {
        if owner != uid && owner != 0 {
            return Err(PasswordFileError::Owner { owner });
        }
        if mode & 0o077 != 0 {
            return Err(PasswordFileError::Exposed { mode: mode & 0o777 });
        }
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(PasswordFileError::Read)?);
    let first = text.lines().next().unwrap_or_default();
    if first.is_empty() {
        return Err(PasswordFileError::Empty);
    }
    Ok(Zeroizing::new(first.to_owned()))
}

/// Cleared once the session is up: from then on nobody may be watching the terminal, so a
/// reconnect that needs a password it does not have fails instead of waiting on a prompt.
static PROMPTS_ALLOWED: AtomicBool = AtomicBool::new(true);

/// Stops asking for passwords on the terminal (call once the first connections are up).
pub fn forbid_prompts() {
    PROMPTS_ALLOWED.store(false, Ordering::Relaxed);
}

/// Set once a password or passphrase prompt was put on the terminal.
static PROMPTED: AtomicBool = AtomicBool::new(false);

/// True once a password or passphrase was asked for on the terminal: progress messages
/// must not be written into the middle of the prompt.
pub fn prompted() -> bool {
    PROMPTED.load(Ordering::Relaxed)
}

/// Records that a prompt is about to be shown.
pub(super) fn note_prompt() {
    PROMPTED.store(true, Ordering::Relaxed);
}

/// What became of the password for a `user@host:port`.
enum Known {
    /// It logged in: reused by the pool's other connections and by reconnects.
    Accepted(Arc<Zeroizing<String>>),
    /// It was refused for good: the pool's other connections do not ask again.
    Refused,
}

/// Passwords by `user@host:port`, for the life of the process. The lock is held while asking
/// and trying, so the pool's parallel connections wait for the one answer.
static KNOWN: tokio::sync::Mutex<BTreeMap<String, Known>> =
    tokio::sync::Mutex::const_new(BTreeMap::new());

/// Logs in with a password, by keyboard-interactive (`kbd`) or password (`pwd`)
/// authentication, whichever the server offers (keyboard-interactive first, as OpenSSH).
pub(super) async fn log_in(
    handle: &mut Handle<Client>,
    opts: &SshOptions,
    user: &str,
    target: &str,
    kbd: bool,
    pwd: bool,
) -> Result<Outcome, SshError> {
    let key = format!("{user}@{target}");
    let mut known = KNOWN.lock().await;
    let refused = || SshError::WrongPassword {
        user: user.to_owned(),
        target: target.to_owned(),
    };
    let (mut password, mut prompted) = match known.get(&key) {
        Some(Known::Accepted(p)) => (p.clone(), false),
        Some(Known::Refused) => return Err(refused()),
        None => match obtain(opts, user, target).await? {
            Some((p, prompted)) => (Arc::new(p), prompted),
            None => return Ok(Outcome::NoPassword),
        },
    };
    let mut attempts = 1;
    loop {
        let ok = (kbd && keyboard_interactive(handle, opts, user, target, &password).await?)
            || (pwd && {
                let auth = handle.authenticate_password(user, password.as_str());
                let r = bounded(opts, target, auth)
                    .await?
                    .map_err(protocol(target))?;
                matches!(r, AuthResult::Success)
            });
        if ok {
            known.insert(key, Known::Accepted(password));
            return Ok(Outcome::LoggedIn);
        }
        // A typo at the prompt is asked again, as ssh does; a file's password is not.
        let again = if prompted && attempts < PROMPT_ATTEMPTS {
            eprintln!("Permission denied, please try again.");
            attempts += 1;
            obtain(opts, user, target).await?
        } else {
            None
        };
        match again {
            Some((p, p_prompted)) => (password, prompted) = (Arc::new(p), p_prompted),
            None => {
                known.insert(key, Known::Refused);
                return Err(refused());
            }
        }
    }
}

/// How many times a password typed at the prompt is asked for (OpenSSH's default).
const PROMPT_ATTEMPTS: u32 = 3;

/// Answers every keyboard-interactive prompt that does not echo with the password.
async fn keyboard_interactive(
    handle: &mut Handle<Client>,
    opts: &SshOptions,
    user: &str,
    target: &str,
    password: &Zeroizing<String>,
) -> Result<bool, SshError> {
    let proto = protocol(target);
    let start = handle.authenticate_keyboard_interactive_start(user, None);
    let mut reply = bounded(opts, target, start).await?.map_err(&proto)?;
    // A server asks a bounded number of rounds (an info message, then the password).
    for _ in 0..4 {
        match reply {
            KeyboardInteractiveAuthResponse::Success => return Ok(true),
            KeyboardInteractiveAuthResponse::Failure { .. } => return Ok(false),
            KeyboardInteractiveAuthResponse::InfoRequest { prompts, .. } => {
                let answers = prompts
                    .iter()
                    .map(|p| {
                        if p.echo {
                            String::new()
                        } else {
                            password.as_str().to_owned()
                        }
                    })
                    .collect();
                let respond = handle.authenticate_keyboard_interactive_respond(answers);
                reply = bounded(opts, target, respond).await?.map_err(&proto)?;
            }
        }
    }
    Ok(false)
}

/// The password from the file, or asked on the terminal (then `true`); `None` when there is
/// no terminal.
async fn obtain(
    opts: &SshOptions,
    user: &str,
    target: &str,
) -> Result<Option<(Zeroizing<String>, bool)>, SshError> {
    if let Some(path) = &opts.password_file {
        let uid = opts.file_owner.map_or(0, |(uid, _)| uid);
        return read_file(path, uid)
            .map(|p| Some((p, false)))
            .map_err(|source| SshError::PasswordFile {
                path: path.clone(),
                source,
            });
    }
    if !PROMPTS_ALLOWED.load(Ordering::Relaxed) {
        debug!("a password is needed, but the session is up: not prompting");
        return Ok(None);
    }
    let prompt = format!("{user}@{target}'s password: ");
    note_prompt();
    let answer = tokio::task::spawn_blocking(move || rpassword::prompt_password(prompt)).await;
    match answer {
        Ok(Ok(p)) => Ok(Some((Zeroizing::new(p), true))),
        Ok(Err(e)) => {
            debug!(error = %e, "no terminal to ask for the password on");
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_password_file_must_be_private_and_not_empty() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let me = nix::unistd::Uid::current().as_raw();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_file(&f, me).unwrap().as_str(), "s3cret");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_file(&f, me).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_file(&f, me).is_ok());
        if me == 0 {
            // Owned by root: accepted for any invoking user; owned by another: refused.
            assert!(read_file(&f, 1234).is_ok());
            std::os::unix::fs::chown(&f, Some(4321), None).unwrap();
            assert!(matches!(
                read_file(&f, 1234),
                Err(PasswordFileError::Owner { owner: 4321 })
            ));
        }
        std::os::unix::fs::chown(&f, Some(me), None).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(read_file(&f, me), Err(PasswordFileError::Empty)));
        assert!(matches!(
            read_file(&dir.join("missing"), me),
            Err(PasswordFileError::Read(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
