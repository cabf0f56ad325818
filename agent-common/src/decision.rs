//! The decision encodings both sides share, each defined once: verdicts, reasons and policy
//! keys. The kernel writes the `u8`/`u32` constants; userspace decodes them here into
//! [`Verdict`], [`Reason`] and ([`policy_key_generation`], [`policy_key_slot`]) a policy key's
//! two halves.

use core::fmt;

/// `EventHeader::verdict` as the kernel writes it.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// Would have been denied; allowed because the policy is in audit mode.
pub const VERDICT_AUDIT_DENY: u8 = 3;

/// `EventHeader::reason` as the kernel writes it.
pub const REASON_RULE: u8 = 1;
pub const REASON_DEFAULT: u8 = 2;
pub const REASON_CHAINING: u8 = 3;
pub const REASON_GRANT: u8 = 4;
pub const REASON_NO_POLICY: u8 = 5;
/// A containment guard: something no policy can allow (a raw socket, source routing).
pub const REASON_CONTAINMENT: u8 = 6;

/// A decision's verdict (`EventHeader::verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Verdict {
    Allow = VERDICT_ALLOW,
    Deny = VERDICT_DENY,
    /// Would have been denied; allowed because the policy is in audit mode.
    AuditDeny = VERDICT_AUDIT_DENY,
}

/// Why a decision was made (`EventHeader::reason`). Adding one: a constant and a variant
/// here, and its protobuf mapping in the agent's pipeline (`reason_pb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// A connect or exec rule matched.
    Rule = REASON_RULE,
    /// No rule matched: the policy's default action.
    Default = REASON_DEFAULT,
    /// A chaining rule tripped by an earlier connect of the same principal.
    Chaining = REASON_CHAINING,
    /// An active just-in-time grant allowed it.
    Grant = REASON_GRANT,
    /// The principal is enrolled but no policy governs it: denied.
    NoPolicy = REASON_NO_POLICY,
    /// A containment guard: a socket or option that would get around the connect hooks.
    Containment = REASON_CONTAINMENT,
}

/// A field value the kernel wrote that this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownValue {
    pub field: &'static str,
    pub value: u64,
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad {} value {}", self.field, self.value)
    }
}

impl core::error::Error for UnknownValue {}

impl Verdict {
    /// Every verdict, in kernel-constant order.
    pub const ALL: [Self; 3] = [Self::Allow, Self::Deny, Self::AuditDeny];

    pub const fn to_kernel(self) -> u8 {
        self as u8
    }

    /// As events, metrics and `corral events --verdict` name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::AuditDeny => "audit-deny",
        }
    }

    /// Position in [`Self::ALL`] (counters indexed by verdict).
    pub const fn index(self) -> usize {
        self as usize - VERDICT_ALLOW as usize
    }
}

impl TryFrom<u8> for Verdict {
    type Error = UnknownValue;
    fn try_from(v: u8) -> Result<Self, UnknownValue> {
        Self::ALL
            .into_iter()
            .find(|x| x.to_kernel() == v)
            .ok_or(UnknownValue {
                field: "verdict",
                value: v as u64,
            })
    }
}

impl Reason {
    /// Every reason, in kernel-constant order.
    pub const ALL: [Self; 6] = [
        Self::Rule,
        Self::Default,
        Self::Chaining,
        Self::Grant,
        Self::NoPolicy,
        Self::Containment,
    ];

    pub const fn to_kernel(self) -> u8 {
        self as u8
    }

    /// As events, metrics and `explain` name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::Default => "default",
            Self::Chaining => "chaining",
            Self::Grant => "grant",
            Self::NoPolicy => "no-policy",
            Self::Containment => "containment",
        }
    }

    /// Position in [`Self::ALL`] (counters indexed by reason).
    pub const fn index(self) -> usize {
        self as usize - REASON_RULE as usize
    }
}

impl TryFrom<u8> for Reason {
    type Error = UnknownValue;
    fn try_from(v: u8) -> Result<Self, UnknownValue> {
        Self::ALL
            .into_iter()
            .find(|x| x.to_kernel() == v)
            .ok_or(UnknownValue {
                field: "reason",
                value: v as u64,
            })
    }
}

/// Bit of a policy key that holds the generation.
const GENERATION_SHIFT: u32 = 31;
/// Bits of a policy key that hold the slot.
const SLOT_MASK: u32 = (1 << GENERATION_SHIFT) - 1;

/// Key of a policy-generation-qualified slot: every policy map key starts with this.
#[inline(always)]
pub const fn policy_key(generation: u32, slot: u32) -> u32 {
    (generation << GENERATION_SHIFT) | (slot & SLOT_MASK)
}

/// The generation (0 or 1) a [`policy_key`] belongs to.
#[inline(always)]
pub const fn policy_key_generation(key: u32) -> u32 {
    key >> GENERATION_SHIFT
}

/// The slot of a [`policy_key`] within its generation.
#[inline(always)]
pub const fn policy_key_slot(key: u32) -> u32 {
    key & SLOT_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_reasons_round_trip() {
        for (i, v) in Verdict::ALL.into_iter().enumerate() {
            assert_eq!(Verdict::try_from(v.to_kernel()), Ok(v));
            assert_eq!(v.index(), i);
        }
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(Reason::try_from(r.to_kernel()), Ok(r));
            assert_eq!(r.index(), i);
        }
        assert_eq!(
            Verdict::try_from(0),
            Err(UnknownValue {
                field: "verdict",
                value: 0
            })
        );
        assert!(Reason::try_from(99).is_err());
    }

    #[test]
    fn policy_key_separates_generations() {
        assert_ne!(policy_key(0, 5), policy_key(1, 5));
        for g in [0, 1] {
            let k = policy_key(g, 5);
            assert_eq!((policy_key_generation(k), policy_key_slot(k)), (g, 5));
        }
    }
}
