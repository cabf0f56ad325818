//! The parsed, position-carrying form of one `AgentPolicy` document. Syntax and per-field
//! checks are done when it is built ([`super::parse`]); references between fields and between
//! documents are checked in [`super::validate`].

use std::time::Duration;

use crate::{
    compiled::{Action, Approval, Mode, Net},
    hosts::HostPattern,
    identity::IdentityPattern,
};

use super::diag::{Pos, Spanned};

#[derive(Debug, Clone)]
pub struct PolicyDoc {
    /// Where the document's top-level mapping starts.
    pub pos: Pos,
    pub name: Spanned<String>,
    pub identities: Vec<Spanned<IdentityPattern>>,
    pub mode: Mode,
    pub default_action: Action,
    pub zones: Vec<ZoneDef>,
    pub connect: Vec<ConnectDef>,
    pub exec: Vec<ExecDef>,
    pub chaining: Vec<ChainDef>,
    pub grants: Vec<GrantDef>,
    /// `spec.dns.allowUnlisted`: names in no zone are forwarded instead of refused.
    pub dns_allow_unlisted: bool,
}

#[derive(Debug, Clone)]
pub struct ZoneDef {
    pub name: Spanned<String>,
    pub nets: Vec<Spanned<Net>>,
    pub unix: Vec<Spanned<String>>,
    pub hosts: Vec<Spanned<HostPattern>>,
}

#[derive(Debug, Clone)]
pub struct ConnectDef {
    pub pos: Pos,
    pub action: Action,
    pub zones: Vec<Spanned<String>>,
    /// Empty: any port.
    pub ports: Vec<u16>,
    /// IP protocol numbers; empty: any.
    pub protocols: Vec<u8>,
}

/// An exec path: exact, or a directory prefix written `/dir/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecPath {
    Exact(String),
    /// The directory with a trailing `/` (`/opt/agent/**` is held as `/opt/agent/`).
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct ExecDef {
    pub pos: Pos,
    pub action: Action,
    pub paths: Vec<Spanned<ExecPath>>,
}

#[derive(Debug, Clone)]
pub struct ChainDef {
    pub pos: Pos,
    pub after: Vec<Spanned<String>>,
    pub deny: Vec<Spanned<String>>,
}

#[derive(Debug, Clone)]
pub struct GrantDef {
    pub pos: Pos,
    pub name: Spanned<String>,
    pub zones: Vec<Spanned<String>>,
    pub ports: Vec<u16>,
    pub protocols: Vec<u8>,
    pub max_ttl: Duration,
    pub approval: Approval,
}
