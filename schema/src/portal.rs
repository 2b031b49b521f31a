//! Portal roles: who may do what in the admin portal.

use serde::{Deserialize, Serialize};

/// A portal role, from the ID token's app roles or a configured group→role mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything: access rules, subscriptions, pools, gateways.
    Admin,
    /// Searches and reads audit content.
    Auditor,
    /// Sees the usage of the groups they lead.
    TeamLead,
    /// Reads the overview.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Auditor, Role::TeamLead, Role::Viewer];

    /// The app-role value in a token (`Admin`, `Auditor`, `TeamLead`, `Viewer`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "Admin",
            Role::Auditor => "Auditor",
            Role::TeamLead => "TeamLead",
            Role::Viewer => "Viewer",
        }
    }

    /// The role named by an app-role value, ignoring ASCII case.
    pub fn parse(value: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_from_their_app_role_values() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("Owner"), None);
    }
}
