//! The Azure deployment template `deploy/azure/gatehouse-dcr.json` (the two `_CL` tables and the
//! data collection rule the Azure Monitor sink writes through) declares exactly the columns the sink
//! sends, with types that hold their values.
//!
//! Rules checked, from the Logs Ingestion API documentation (`azure-specs.md` §4.2): the body's
//! objects must match the DCR's `streamDeclarations`; custom tables end in `_CL`, output streams
//! of custom tables start with `Custom-`; column names start with a letter and have at most 45
//! letters, digits or underscores, and some names are reserved.

#![recursion_limit = "256"]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use gatehouse_audit::AuditRecord;
use gatehouse_audit::azure_monitor::{
    CALL_TIME_COLUMN, DEFAULT_GATEWAY_STREAM, DEFAULT_LLM_STREAM, ROW_ID_COLUMN,
};
use gatehouse_audit::rows::{GatewayLogRow, LlmLogRow};
use serde_json::{Map, Value, json};

#[path = "support/column_names.rs"]
mod column_names;
use column_names::assert_valid_column_name;

const TEMPLATE: &str = include_str!("../../deploy/azure/gatehouse-dcr.json");

/// A call with every optional field set, so that every column carries a value.
fn record() -> AuditRecord {
    let prompt = json!([{"role": "user", "content": "how many invoices are open?"}]).to_string();
    let completion = json!([{"role": "assistant", "content": "Seven."}]).to_string();
    serde_json::from_value(json!({
        "TimeGenerated": "2026-12-01T10:00:00.123456Z",
        "CorrelationId": "call-1", "GatewayId": "gw-1", "OperationId": "chatcompletions_create",
        "CallerIpAddress": "203.0.113.7", "PeerIpAddress": "10.0.0.1", "Method": "POST",
        "Url": "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "ClientProtocol": "HTTP/1.1",
        "ResponseCode": 200, "IsRequestSuccess": true, "BackendResponseCode": 200,
        "BackendId": "east", "BackendUrl": "https://east.example/openai", "RequestSize": 120, "ResponseSize": 300,
        "TotalTime": 812, "BackendTime": 790, "TimeToFirstByte": 240, "TimeToFirstToken": 260, "ApimSubscriptionId": "team-a",
        "ProductId": "research", "UserId": "oid-1", "UserName": "ada@contoso.com", "TenantId": "tenant-1",
        "Groups": ["group-red"], "DeploymentName": "gpt-4o", "ModelName": "gpt-4o-2024-08-06",
        "ApiVersion": "2024-10-21", "IsStreamCompletion": true,
        "Usage": {"PromptTokens": 12, "CompletionTokens": 3, "TotalTokens": 15, "CachedTokens": 0, "ReasoningTokens": 0, "IsEstimate": false},
        "Attempts": [{"BackendId": "east", "Status": 200, "ElapsedMs": 790, "Error": null}],
        "BackendRequestBody": json!({"messages": serde_json::from_str::<Value>(&prompt).unwrap()}).to_string(),
        "RequestBodyTruncated": false,
        "BackendResponseBody": json!({"object": "chat.completion"}).to_string(), "ResponseBodyTruncated": false,
        "RequestMessages": prompt, "ResponseMessages": completion, "ClientAborted": false,
        "LastErrorReason": "none", "LastErrorMessage": "none",
        "Chain": {"ChainId": "gw-1/2026-12-01", "Sequence": 4, "PreviousHash": "00", "RecordHash": "11", "ContentHash": "22"}
    }))
    .unwrap()
}

/// A row as the sink sends it: the row's columns plus the row id and the call's time again.
fn sent(row: Value) -> Map<String, Value> {
    let Value::Object(mut object) = row else {
        panic!("a row serialises to an object");
    };
    object.insert(ROW_ID_COLUMN.to_owned(), json!("call-1:table:0"));
    let call_time = object["TimeGenerated"].clone();
    object.insert(CALL_TIME_COLUMN.to_owned(), call_time);
    object
}

fn template() -> Value {
    serde_json::from_str(TEMPLATE).expect("the template is JSON")
}

fn resource<'a>(template: &'a Value, kind: &str) -> Vec<&'a Value> {
    template["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == kind)
        .collect()
}

/// `(name, type)` of a column list.
fn columns(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn stream_columns(template: &Value, stream: &str) -> Vec<(String, String)> {
    let dcr = resource(template, "Microsoft.Insights/dataCollectionRules");
    assert_eq!(dcr.len(), 1, "one data collection rule");
    columns(&dcr[0]["properties"]["streamDeclarations"][stream]["columns"])
}

fn table_columns(template: &Value, table: &str) -> Vec<(String, String)> {
    let tables = resource(template, "Microsoft.OperationalInsights/workspaces/tables");
    let table = tables
        .iter()
        .find(|t| t["properties"]["schema"]["name"] == table)
        .unwrap_or_else(|| panic!("table {table} is declared"));
    columns(&table["properties"]["schema"]["columns"])
}

/// Whether `value` can be sent to a column of `kind` (null fits any column).
fn fits(kind: &str, value: &Value) -> bool {
    match (kind, value) {
        (_, Value::Null) => true,
        ("string", Value::String(_)) => true,
        ("datetime", Value::String(text)) => {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_ok()
        }
        ("boolean", Value::Bool(_)) => true,
        ("int", Value::Number(n)) => n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        ("long", Value::Number(n)) => n.as_i64().is_some(),
        ("dynamic", _) => true,
        _ => false,
    }
}

fn check_stream(stream: &str, rows: &[Map<String, Value>]) {
    let template = template();
    let declared = stream_columns(&template, stream);
    let table = stream.strip_prefix("Custom-").expect("a custom stream");
    assert!(table.ends_with("_CL"), "{table}: custom tables end in _CL");
    assert_eq!(
        table_columns(&template, table),
        declared,
        "the table {table} has the stream's columns"
    );
    for (name, _) in &declared {
        assert_valid_column_name(name);
    }
    assert!(declared.contains(&("TimeGenerated".to_owned(), "datetime".to_owned())));
    // The call's own time, kept whatever Azure does to a late row's TimeGenerated.
    assert!(declared.contains(&(CALL_TIME_COLUMN.to_owned(), "datetime".to_owned())));
    for row in rows {
        let mut sent_names: Vec<&String> = row.keys().collect();
        let mut declared_names: Vec<&String> = declared.iter().map(|(n, _)| n).collect();
        sent_names.sort();
        declared_names.sort();
        assert_eq!(
            sent_names, declared_names,
            "{stream}: the declaration lists exactly the columns sent"
        );
        for (name, kind) in &declared {
            assert!(
                fits(kind, &row[name]),
                "{stream}: {name} is declared {kind} but the sink sends {}",
                row[name]
            );
        }
    }
    let dcr = resource(&template, "Microsoft.Insights/dataCollectionRules")[0];
    let flows = dcr["properties"]["dataFlows"].as_array().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["streams"] == json!([stream]) && f["outputStream"] == stream),
        "{stream} flows into its table"
    );
}

#[test]
fn the_gateway_log_stream_declares_the_columns_the_sink_sends() {
    let row = serde_json::to_value(GatewayLogRow::from_record(&record())).unwrap();
    let row = sent(row);
    // Every optional column carries a value here, so each type is checked against a real one.
    let empty: Vec<&String> = row
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k)
        .collect();
    assert!(
        empty.is_empty(),
        "columns left empty by the fixture: {empty:?}"
    );
    check_stream(DEFAULT_GATEWAY_STREAM, &[row]);
}

#[test]
fn the_llm_log_stream_declares_the_columns_the_sink_sends() {
    let rows: Vec<Map<String, Value>> = LlmLogRow::from_record(&record())
        .iter()
        .map(|row| sent(serde_json::to_value(row).unwrap()))
        .collect();
    assert_eq!(rows.len(), 3, "a header row and two message pieces");
    check_stream(DEFAULT_LLM_STREAM, &rows);
}

#[test]
fn a_column_of_the_wrong_type_is_noticed() {
    // The check itself: a token count declared `int` does not hold text, nor a count past i32.
    assert!(!fits("int", &json!("12")));
    assert!(!fits("int", &json!(5_000_000_000_i64)));
    assert!(fits("long", &json!(5_000_000_000_i64)));
    assert!(!fits("datetime", &json!("yesterday")));
}
