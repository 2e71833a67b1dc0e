//! IKEv2 (RFC 7296) keying for espip's ESP SAs, sans I/O: [`msg`] (the wire format),
//! [`crypto`] (PRF, key derivation, Diffie-Hellman), [`proposal`] (strongSwan's notation
//! and the responder's choice), [`ts`] (traffic selectors), [`engine`] (one peer's state
//! machine: datagrams and time in, datagrams and SA changes out).

pub mod crypto;
pub mod engine;
pub mod msg;
pub mod point;
pub mod proposal;
pub mod ts;
