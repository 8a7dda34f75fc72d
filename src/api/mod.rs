//! The HTTP API of SPEC §4: the server ([`server`]), the typed client ([`client`]) used by the
//! CLI and the node agent, and the wire types they share ([`wire`]).

pub(crate) mod client;
mod limits;
pub(crate) mod server;
pub mod wire;
