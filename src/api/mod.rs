//! The HTTP API of SPEC §4: the server ([`server`]: [`crate::Server`], its settings and the
//! views of the engine's model), the typed client ([`client`]) used by the CLI and the node
//! agent, and the wire types they share ([`wire`]). With the `tls` feature, [`tls`] lets both
//! speak https. The engine never imports this module.

pub(crate) mod client;
mod limits;
pub(crate) mod server;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub mod wire;
