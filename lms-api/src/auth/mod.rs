//! Authentication: password hashing ([`password`]), access and refresh
//! tokens ([`token`]) and the [`caller::Caller`] extractor that turns a
//! bearer token into the signed-in user.

pub mod caller;
pub mod password;
pub mod token;

pub use caller::Caller;
