//! Log Analytics' rules for custom column names, shared by the tests that check what the Azure
//! Monitor sink sends (`azure_monitor.rs`) and the deployment template (`dcr.rs`).

/// Log Analytics' rules for custom column names (`azure-specs.md` §4.2).
pub fn assert_valid_column_name(name: &str) {
    const RESERVED: [&str; 7] = [
        "_ResourceId",
        "id",
        "_SubscriptionId",
        "TenantId",
        "Type",
        "UniqueId",
        "Title",
    ];
    assert!(
        name.len() <= 45
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !RESERVED.contains(&name),
        "`{name}` is not a valid Log Analytics column name"
    );
}
