//! QueryService over the wire (counts, breakdowns, listings, exports, samples, overlap, per-user
//! lookups), plus health and reflection. Expected answers come from filtering the test's own
//! rows, never from the server.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use audience::grpc::pb;
use pb::CompareOp;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::node::{self, b, s};
use crate::harness::*;

type Keep = Box<dyn Fn(&Person) -> bool>;

/// Equivalent text and tree forms of one expression, and the row filter that defines it.
fn cases() -> Vec<(&'static str, pb::Node, Keep)> {
    use node::*;
    vec![
        (
            r#"country = "US""#,
            eq("country", s("US")),
            Box::new(|p| p.country == Some("US")),
        ),
        (
            r#"country != "US""#,
            ne("country", s("US")),
            Box::new(|p| p.country.is_some_and(|c| c != "US")),
        ),
        (
            r#"country IN ("GB", "DE")"#,
            in_("country", vec![s("GB"), s("DE")]),
            Box::new(|p| matches!(p.country, Some("GB" | "DE"))),
        ),
        (
            r#"country NOT IN ("GB")"#,
            pb::Node {
                node: Some(pb::node::Node::In(pb::InPredicate {
                    attribute: "country".into(),
                    values: vec![s("GB")],
                    negated: true,
                })),
            },
            Box::new(|p| p.country.is_some_and(|c| c != "GB")),
        ),
        (
            r#"interests HAS "sports""#,
            has("interests", s("sports")),
            Box::new(|p| p.has("sports")),
        ),
        (
            r#"interests HAS ANY ("music", "tech")"#,
            has_any("interests", vec![s("music"), s("tech")]),
            Box::new(|p| p.has("music") || p.has("tech")),
        ),
        (
            r#"interests HAS ALL ("sports", "travel")"#,
            has_all("interests", vec![s("sports"), s("travel")]),
            Box::new(|p| p.has("sports") && p.has("travel")),
        ),
        (
            "age < 30",
            compare("age", CompareOp::Lt, lit(i(30))),
            Box::new(|p| p.age.is_some_and(|a| a < 30)),
        ),
        (
            "age <= 30",
            compare("age", CompareOp::Le, lit(i(30))),
            Box::new(|p| p.age.is_some_and(|a| a <= 30)),
        ),
        (
            "age > 60",
            compare("age", CompareOp::Gt, lit(i(60))),
            Box::new(|p| p.age.is_some_and(|a| a > 60)),
        ),
        (
            "age >= 60",
            compare("age", CompareOp::Ge, lit(i(60))),
            Box::new(|p| p.age.is_some_and(|a| a >= 60)),
        ),
        (
            "age BETWEEN 25 AND 34",
            between("age", lit(i(25)), lit(i(34))),
            Box::new(|p| p.age.is_some_and(|a| (25..=34).contains(&a))),
        ),
        (
            "age < 30.5",
            compare("age", CompareOp::Lt, lit(f(30.5))),
            Box::new(|p| p.age.is_some_and(|a| a <= 30)),
        ),
        (
            "age = 25",
            eq("age", i(25)),
            Box::new(|p| p.age == Some(25)),
        ),
        (
            "age IN (18, 25, 32)",
            in_("age", vec![i(18), i(25), i(32)]),
            Box::new(|p| matches!(p.age, Some(18 | 25 | 32))),
        ),
        (
            "age IS NULL",
            is_null("age", false),
            Box::new(|p| p.age.is_none()),
        ),
        (
            "age IS NOT NULL",
            is_null("age", true),
            Box::new(|p| p.age.is_some()),
        ),
        (
            "NOT age < 30",
            not(compare("age", CompareOp::Lt, lit(i(30)))),
            Box::new(|p| p.age.is_none_or(|a| a >= 30)),
        ),
        (
            "subscriber = TRUE",
            eq("subscriber", b(true)),
            Box::new(|p| p.subscriber == Some(true)),
        ),
        (
            "subscriber = FALSE",
            eq("subscriber", b(false)),
            Box::new(|p| p.subscriber == Some(false)),
        ),
        (
            "spend > 100.5",
            compare("spend", CompareOp::Gt, lit(f(100.5))),
            Box::new(|p| p.spend.is_some_and(|v| v > 100.5)),
        ),
        (
            "spend <= 50",
            compare("spend", CompareOp::Le, lit(i(50))),
            Box::new(|p| p.spend.is_some_and(|v| v <= 50.0)),
        ),
        (
            r#"country = "US" AND age BETWEEN 25 AND 34 OR interests HAS "tech""#,
            or(vec![
                and(vec![
                    eq("country", s("US")),
                    between("age", lit(i(25)), lit(i(34))),
                ]),
                has("interests", s("tech")),
            ]),
            Box::new(|p| {
                (p.country == Some("US") && p.age.is_some_and(|a| (25..=34).contains(&a)))
                    || p.has("tech")
            }),
        ),
        (
            r#"NOT (country = "US" OR country = "GB") AND subscriber = TRUE"#,
            and(vec![
                not(or(vec![eq("country", s("US")), eq("country", s("GB"))])),
                eq("subscriber", b(true)),
            ]),
            Box::new(|p| !matches!(p.country, Some("US" | "GB")) && p.subscriber == Some(true)),
        ),
        (
            r#"country = "FR""#,
            eq("country", s("FR")),
            Box::new(|_| false),
        ),
    ]
}

#[tokio::test]
async fn count_text_and_tree_match_the_rows() {
    let (server, people) = server_with_people(300).await;
    for (text_form, tree_form, keep) in cases() {
        let expected = people_where(&people, &keep);
        assert_eq!(
            count(&server, "", text(text_form)).await,
            expected.len() as u64,
            "count of {text_form}"
        );
        assert_eq!(
            count(&server, "", tree(tree_form.clone())).await,
            expected.len() as u64,
            "count of the tree of {text_form}"
        );
        assert_eq!(
            members(&server, "", text(text_form)).await,
            expected,
            "members of {text_form}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn count_of_a_saved_segment_reads_its_members() {
    let (server, people) = server_with_people(120).await;
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "us_sports".into(),
            expression: Some(text_expr(r#"country = "US" AND interests HAS "sports""#)),
            ..Default::default()
        })
        .await
        .unwrap();
    let expected = people_where(&people, |p| p.country == Some("US") && p.has("sports"));
    assert!(!expected.is_empty());
    assert_eq!(
        count(&server, "", segment_audience("us_sports")).await,
        expected.len() as u64
    );
    assert_eq!(
        members(&server, "", segment_audience("us_sports")).await,
        expected
    );
    // A saved segment used inside an expression.
    let young = people_where(&people, |p| {
        p.country == Some("US") && p.has("sports") && p.age.is_some_and(|a| a < 40)
    });
    assert_eq!(
        members(&server, "", text(r#"SEGMENT "us_sports" AND age < 40"#)).await,
        young
    );
    server.shutdown().await;
}

/// Checks a breakdown against each matching user's values: every returned count is exact,
/// entries run largest first, no value left out has more users than one returned, users holding
/// a value left out make the other count, and users with no value make the null count. Ties may fall either way.
#[track_caller]
fn check_breakdown(response: &pb::CountResponse, values: &[Vec<String>], limit: usize) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut nulls = 0;
    for user_values in values {
        if user_values.is_empty() {
            nulls += 1;
        }
        for v in user_values {
            *counts.entry(v.clone()).or_default() += 1;
        }
    }
    assert_eq!(response.count, values.len() as u64, "count");
    assert_eq!(response.breakdown_null_count, nulls, "null count");
    assert_eq!(
        response.breakdown.len(),
        counts.len().min(limit),
        "entries: {:?}",
        response.breakdown
    );
    let returned = breakdown_map(&response.breakdown);
    assert_eq!(returned.len(), response.breakdown.len(), "values repeat");
    for entry in &response.breakdown {
        assert_eq!(
            Some(&entry.count),
            counts.get(&entry.value),
            "count of {:?}",
            entry.value
        );
    }
    assert!(
        response
            .breakdown
            .windows(2)
            .all(|w| w[0].count >= w[1].count),
        "largest first: {:?}",
        response.breakdown
    );
    let smallest_kept = response.breakdown.last().map_or(0, |e| e.count);
    for (v, &n) in counts.iter().filter(|(v, _)| !returned.contains_key(*v)) {
        assert!(n <= smallest_kept, "{v} ({n}) left out of the top");
    }
    // Users, not (user, value) pairs: a user holding two left-out values counts once.
    let left_out = values
        .iter()
        .filter(|user| user.iter().any(|v| !returned.contains_key(v)))
        .count() as u64;
    assert_eq!(response.breakdown_other_count, left_out, "other count");
}

async fn breakdown(
    server: &TestServer,
    expr: &str,
    attribute: &str,
    limit: u32,
) -> pb::CountResponse {
    server
        .query()
        .count(pb::CountRequest {
            audience: text(expr),
            breakdown_attribute: attribute.into(),
            breakdown_limit: limit,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn count_breakdown_top_n_with_null_and_other_counts() {
    let (server, people) = server_with_people(400).await;
    let matching: Vec<&Person> = people.iter().filter(|p| p.spend.is_some()).collect();
    let expr = "spend IS NOT NULL";

    // Categorical, top 2 of 3 values, with nulls and others.
    let response = breakdown(&server, expr, "country", 2).await;
    let values: Vec<Vec<String>> = matching
        .iter()
        .map(|p| p.country.map(str::to_owned).into_iter().collect())
        .collect();
    check_breakdown(&response, &values, 2);
    assert!(response.breakdown_null_count > 0 && response.breakdown_other_count > 0);
    // US holds two of every five people: it leads.
    assert_eq!(response.breakdown[0].value, "US");

    // A set attribute: a user counts once in each value held (and once in the others).
    let response = breakdown(&server, expr, "interests", 3).await;
    let values: Vec<Vec<String>> = matching
        .iter()
        .map(|p| p.interests.iter().map(|v| (*v).to_owned()).collect())
        .collect();
    check_breakdown(&response, &values, 3);

    // Booleans print as true/false.
    let response = breakdown(&server, expr, "subscriber", 20).await;
    let values: Vec<Vec<String>> = matching
        .iter()
        .map(|p| p.subscriber.map(|b| b.to_string()).into_iter().collect())
        .collect();
    check_breakdown(&response, &values, 20);
    assert_eq!(response.breakdown.len(), 2);

    // An empty audience has an empty breakdown.
    let response = breakdown(&server, r#"country = "FR""#, "country", 5).await;
    check_breakdown(&response, &[], 5);
    server.shutdown().await;
}

#[tokio::test]
async fn demo_dataset_counts_and_breakdown_match_the_generated_rows() {
    const USERS: u64 = 5_000;
    let server = TestServer::start().await;
    let outcome = load_demo(server.engine(), "default", USERS, 700, 42).await;
    assert_eq!(outcome.created, USERS);
    let rows = demo_rows(USERS, 42);
    // 2025-06-01T00:00:00Z, computed outside the service.
    const JUNE_2025: i64 = 1_748_736_000_000;
    type RowFilter = Box<dyn Fn(&DemoRow) -> bool>;
    let checks: Vec<(&str, RowFilter)> = vec![
        (
            r#"country = "US" AND age BETWEEN 25 AND 34 AND interests HAS "sports""#,
            Box::new(|r| {
                r.country.as_deref() == Some("US")
                    && r.age.is_some_and(|a| (25..=34).contains(&a))
                    && r.interests.contains("sports")
            }),
        ),
        (
            r#"device = "ios" AND NOT country IN ("US", "GB")"#,
            Box::new(|r| {
                r.device.as_deref() == Some("ios")
                    && !matches!(r.country.as_deref(), Some("US" | "GB"))
            }),
        ),
        (
            "subscriber = TRUE AND lifetime_spend > 1000",
            Box::new(|r| {
                r.subscriber == Some(true) && r.lifetime_spend.is_some_and(|v| v > 1000.0)
            }),
        ),
        (
            r#"signup_ts >= "2025-06-01T00:00:00Z""#,
            Box::new(|r| r.signup_ts.is_some_and(|t| t >= JUNE_2025)),
        ),
        (
            r#"gender IS NULL OR age IS NULL"#,
            Box::new(|r| r.gender.is_none() || r.age.is_none()),
        ),
        (
            r#"interests HAS ALL ("sports", "travel") AND lifetime_spend IS NULL"#,
            Box::new(|r| {
                r.interests.contains("sports")
                    && r.interests.contains("travel")
                    && r.lifetime_spend.is_none()
            }),
        ),
    ];
    for (expr, keep) in &checks {
        let expected = ids_where(&rows, keep, |r| r.user_id.as_str());
        assert!(!expected.is_empty(), "{expr} selects someone");
        assert_eq!(
            count(&server, "", text(expr)).await,
            expected.len() as u64,
            "{expr}"
        );
        assert_eq!(members(&server, "", text(expr)).await, expected, "{expr}");
    }
    let response = breakdown(&server, r#"device = "android""#, "country", 5).await;
    let values: Vec<Vec<String>> = rows
        .iter()
        .filter(|r| r.device.as_deref() == Some("android"))
        .map(|r| r.country.clone().into_iter().collect())
        .collect();
    check_breakdown(&response, &values, 5);
    assert_eq!(
        response.breakdown[0].value, "US",
        "the heaviest country leads"
    );
    server.shutdown().await;
}

async fn list_page(
    server: &TestServer,
    audience: Option<pb::Audience>,
    page_size: u32,
    token: &str,
) -> Result<pb::ListMembersResponse, tonic::Status> {
    server
        .query()
        .list_members(pb::ListMembersRequest {
            audience,
            page_size,
            page_token: token.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn list_members_pages_concatenate_to_the_full_set() {
    let (server, people) = server_with_people(250).await;
    let expected = people_where(&people, |p| p.country == Some("US"));
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_page(&server, text(r#"country = "US""#), 7, &token)
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.total_count, expected.len() as u64);
        assert!(page.user_ids.len() <= 7);
        seen.extend(page.user_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 1000, "listing never ends");
    }
    assert_eq!(pages, expected.len().div_ceil(7));
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no id repeats across pages");
    assert_eq!(sorted(seen), expected);

    // Page size 0 means the default (1000): everything in one page, no token.
    let page = list_page(&server, text(r#"country = "US""#), 0, "")
        .await
        .unwrap();
    assert_eq!(sorted(page.user_ids), expected);
    assert!(page.next_page_token.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn list_members_later_pages_read_the_first_pages_snapshot() {
    let (server, people) = server_with_people(200).await;
    let expected = people_where(&people, |p| p.country == Some("US"));
    let first = list_page(&server, text(r#"country = "US""#), 10, "")
        .await
        .unwrap();
    assert_eq!(first.user_ids.len(), 10);
    let first_ids: BTreeSet<String> = first.user_ids.iter().cloned().collect();

    // Writes between pages: new matching users, a matching user deleted, one moved away.
    let later: Vec<&String> = expected
        .iter()
        .filter(|id| !first_ids.contains(*id))
        .collect();
    let (gone, moved) = (later[3].clone(), later[5].clone());
    let mut ingest = server.ingest();
    ingest
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![
                update::user("zz-new-1", vec![update::string("country", "US")]),
                update::user("zz-new-2", vec![update::string("country", "US")]),
                update::user(&moved, vec![update::string("country", "GB")]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    ingest
        .delete_users(pb::DeleteUsersRequest {
            user_ids: vec![gone.clone()],
            ..Default::default()
        })
        .await
        .unwrap();

    let mut rest = Vec::new();
    let mut token = first.next_page_token.clone();
    while !token.is_empty() {
        let page = list_page(&server, None, 10, &token).await.unwrap();
        assert_eq!(page.total_count, expected.len() as u64);
        rest.extend(page.user_ids);
        token = page.next_page_token;
    }
    let mut all: Vec<String> = first.user_ids.clone();
    all.extend(rest);
    assert_eq!(sorted(all), expected, "the listing kept its snapshot");

    // A new listing sees the writes.
    let mut now: Vec<String> = expected
        .iter()
        .filter(|id| **id != gone && **id != moved)
        .cloned()
        .collect();
    now.extend(["zz-new-1".to_owned(), "zz-new-2".to_owned()]);
    let fresh = list_page(&server, text(r#"country = "US""#), 1000, "")
        .await
        .unwrap();
    assert_eq!(sorted(fresh.user_ids), sorted(now));
    server.shutdown().await;
}

#[tokio::test]
async fn list_members_rejects_bad_page_tokens() {
    let (server, _) = server_with_people(50).await;
    let first = list_page(&server, text(r#"country = "US""#), 3, "")
        .await
        .unwrap();
    let unknown = format!("{:0>64}", "1234abcd");
    let mut flipped: Vec<char> = first.next_page_token.chars().collect();
    flipped[0] = if flipped[0] == '0' { '1' } else { '0' };
    let flipped: String = flipped.into_iter().collect();
    let wrong_case = first.next_page_token.to_uppercase();
    for token in ["garbage", &unknown, &flipped, &wrong_case, &"z".repeat(64)] {
        let status = list_page(&server, None, 3, token).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, &["page_token"]);
    }
    // The real token still works after the bad ones.
    let second = list_page(&server, None, 3, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.user_ids.len(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn list_members_evicts_the_oldest_listing_past_the_open_cursor_limit() {
    let limits = audience::engine::Limits {
        max_open_cursors: 1,
        ..Default::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    load_people(&server, "", &people(50)).await;
    let first = list_page(&server, text(r#"country = "US""#), 3, "")
        .await
        .unwrap();
    let second = list_page(&server, text(r#"country = "GB""#), 3, "")
        .await
        .unwrap();
    let status = list_page(&server, None, 3, &first.next_page_token)
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, &["page token"]);
    list_page(&server, None, 3, &second.next_page_token)
        .await
        .unwrap();
    server.shutdown().await;
}

/// Exports whose callers never read must not hold the threads every query needs: 600 of them
/// stall (the client's windows, 5 MB a connection, hold a dozen of these 400 KB exports per
/// connection; the rest wait, more than tokio's 512 blocking threads), and a count still
/// answers at once.
#[tokio::test]
async fn exports_nobody_reads_leave_queries_answering() {
    let (server, _) = server_with_people(100_000).await;
    let mut parked = Vec::new();
    for _ in 0..4 {
        let channel = tonic::transport::Channel::from_shared(server.addr())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = pb::query_service_client::QueryServiceClient::new(channel);
        for _ in 0..150 {
            let stream = client
                .export_members(pb::ExportMembersRequest {
                    audience: text(r#"NOT country = "none""#),
                    // Chunks of ~25 KB: few frames, which the client's HTTP/2 accepts.
                    chunk_size: 1_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            parked.push(stream);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        server.query().count(pb::CountRequest {
            audience: text("age > 30"),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "a count behind 600 unread exports: {answered:?}"
    );
    drop(parked);
    server.shutdown().await;
}

#[tokio::test]
async fn export_members_chunks_cover_the_full_set_with_progress() {
    let (server, people) = server_with_people(300).await;
    let expected = people_where(&people, |p| p.country != Some("DE"));
    let mut stream = server
        .query()
        .export_members(pb::ExportMembersRequest {
            audience: text(r#"NOT country = "DE""#),
            chunk_size: 16,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks += 1;
        assert!(!chunk.user_ids.is_empty() && chunk.user_ids.len() <= 16);
        ids.extend(chunk.user_ids);
        assert_eq!(chunk.sent, ids.len() as u64, "sent counts ids so far");
        assert_eq!(chunk.total, expected.len() as u64);
    }
    assert_eq!(chunks, expected.len().div_ceil(16));
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    assert_eq!(sorted(ids), expected);

    // An empty audience ends the stream cleanly without ids.
    let mut stream = server
        .query()
        .export_members(pb::ExportMembersRequest {
            audience: text(r#"country = "FR""#),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        total += chunk.user_ids.len();
    }
    assert_eq!(total, 0);
    server.shutdown().await;
}

async fn sample(
    server: &TestServer,
    expr: &str,
    size: u32,
    seed: u64,
) -> pb::SampleMembersResponse {
    server
        .query()
        .sample_members(pb::SampleMembersRequest {
            audience: text(expr),
            size,
            seed,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn sample_members_is_reproducible_sized_and_a_subset() {
    let (server, people) = server_with_people(200).await;
    let expr = r#"country = "US""#;
    let expected: BTreeSet<String> = people_where(&people, |p| p.country == Some("US"))
        .into_iter()
        .collect();
    assert_eq!(expected.len(), 80);

    let a = sample(&server, expr, 10, 7).await;
    let again = sample(&server, expr, 10, 7).await;
    assert_eq!(a.user_ids, again.user_ids, "same seed, same sample");
    assert_eq!(a.total_count, 80);
    assert_eq!(a.user_ids.len(), 10);
    let distinct: BTreeSet<String> = a.user_ids.iter().cloned().collect();
    assert_eq!(distinct.len(), 10, "without replacement");
    assert!(distinct.is_subset(&expected));
    let other = sample(&server, expr, 10, 8).await;
    assert_ne!(
        sorted(a.user_ids.clone()),
        sorted(other.user_ids),
        "another seed gives another sample"
    );

    // Asking for more than there are returns everyone.
    let all = sample(&server, expr, 500, 1).await;
    assert_eq!(
        all.user_ids.iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );

    // Over many seeds every member gets picked, and none far more often than the rest
    // (expected 25 picks each out of 200 samples of 10 from 80).
    let mut picks: BTreeMap<String, u32> = BTreeMap::new();
    for seed in 0..200 {
        for id in sample(&server, expr, 10, seed).await.user_ids {
            *picks.entry(id).or_default() += 1;
        }
    }
    assert_eq!(picks.len(), 80, "every member is sampled at some seed");
    assert!(
        picks.values().all(|&n| (5..=60).contains(&n)),
        "picks are roughly uniform: {picks:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn overlap_matches_sets_computed_from_the_rows() {
    let (server, people) = server_with_people(300).await;
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "subs".into(),
            expression: Some(tree_expr(node::eq("subscriber", b(true)))),
            ..Default::default()
        })
        .await
        .unwrap();
    let sets: Vec<BTreeSet<String>> = vec![
        people_where(&people, |p| p.country == Some("US")),
        people_where(&people, |p| p.has("sports")),
        people_where(&people, |p| p.subscriber == Some(true)),
        people_where(&people, |p| p.age.is_some_and(|a| a >= 50)),
    ]
    .into_iter()
    .map(|v| v.into_iter().collect())
    .collect();
    let response = server
        .query()
        .overlap(pb::OverlapRequest {
            audiences: vec![
                text(r#"country = "US""#).unwrap(),
                tree(node::has("interests", s("sports"))).unwrap(),
                segment_audience("subs").unwrap(),
                text("age >= 50").unwrap(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.sizes,
        sets.iter().map(|s| s.len() as u64).collect::<Vec<_>>()
    );
    let mut pairs = Vec::new();
    for x in 0..sets.len() {
        for y in x + 1..sets.len() {
            pairs.push((
                x as u32,
                y as u32,
                sets[x].intersection(&sets[y]).count() as u64,
            ));
        }
    }
    assert_eq!(
        response
            .pairs
            .iter()
            .map(|p| (p.first, p.second, p.intersection_count))
            .collect::<Vec<_>>(),
        pairs
    );
    let all = sets.iter().skip(1).fold(sets[0].clone(), |acc, s| {
        acc.intersection(s).cloned().collect()
    });
    assert_eq!(response.intersection_count, all.len() as u64);
    let mut reach = BTreeSet::new();
    let mut cumulative = Vec::new();
    for set in &sets {
        reach.extend(set.iter().cloned());
        cumulative.push(reach.len() as u64);
    }
    assert_eq!(response.cumulative_reach, cumulative);
    assert_eq!(response.union_count, reach.len() as u64);
    server.shutdown().await;
}

async fn create(server: &TestServer, id: &str, expr: &str) {
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: id.into(),
            expression: Some(text_expr(expr)),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn segments_for_user_and_check_membership() {
    let (server, people) = server_with_people(100).await;
    create(&server, "us", r#"country = "US""#).await;
    create(&server, "sports", r#"interests HAS "sports""#).await;
    create(&server, "young", "age < 30").await;
    create(&server, "nobody", r#"country = "FR""#).await;
    type Rule = fn(&Person) -> bool;
    let rules: [(&str, Rule); 4] = [
        ("nobody", |_| false),
        ("sports", |p| p.has("sports")),
        ("us", |p| p.country == Some("US")),
        ("young", |p| p.age.is_some_and(|a| a < 30)),
    ];
    let mut query = server.query();
    for person in &people {
        let expected: Vec<String> = rules
            .iter()
            .filter(|(_, rule)| rule(person))
            .map(|(id, _)| (*id).to_owned())
            .collect();
        let got = query
            .segments_for_user(pb::SegmentsForUserRequest {
                user_id: person.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .segment_ids;
        assert_eq!(got, expected, "segments of {}", person.id);

        let asked = vec!["young".to_owned(), "us".to_owned(), "nobody".to_owned()];
        let check = query
            .check_membership(pb::CheckMembershipRequest {
                user_id: person.id.clone(),
                segment_ids: asked.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(check.user_exists);
        let flags: Vec<(String, bool)> = check
            .memberships
            .into_iter()
            .map(|m| (m.segment_id, m.member))
            .collect();
        let wanted: Vec<(String, bool)> = asked
            .iter()
            .map(|id| {
                let rule = rules.iter().find(|(r, _)| r == id).unwrap().1;
                (id.clone(), rule(person))
            })
            .collect();
        assert_eq!(flags, wanted, "membership of {}", person.id);
    }

    // An unknown user is in nothing and does not exist.
    let got = query
        .segments_for_user(pb::SegmentsForUserRequest {
            user_id: "nobody-at-all".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.segment_ids.is_empty());
    let check = query
        .check_membership(pb::CheckMembershipRequest {
            user_id: "nobody-at-all".into(),
            segment_ids: vec!["us".into(), "young".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.user_exists);
    assert_eq!(
        check
            .memberships
            .iter()
            .map(|m| (m.segment_id.as_str(), m.member))
            .collect::<Vec<_>>(),
        vec![("us", false), ("young", false)]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn now_is_anchored_by_as_of_or_the_injected_clock() {
    let clock = FixedClock::new(JAN_1_2026);
    let server = TestServer::start_with(ServerOptions::default().clock(clock.clone())).await;
    const DAY: i64 = 86_400_000;
    // Signed up 0..60 days before 2026-01-01, one user a day.
    let users: Vec<pb::UserUpdate> = (0..60)
        .map(|d| {
            update::user(
                &format!("u{d:02}"),
                vec![update::timestamp("signup", JAN_1_2026 - d * DAY)],
            )
        })
        .collect();
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .unwrap();
    let count_as_of = |as_of: Option<i64>, expr: &'static str| {
        let mut query = server.query();
        async move {
            query
                .count(pb::CountRequest {
                    audience: text(expr),
                    as_of: as_of.map(|ms| prost_types::Timestamp {
                        seconds: ms / 1000,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .count
        }
    };
    // [now - 30d, now]: days 0..=30.
    assert_eq!(count_as_of(None, "signup >= NOW - 30d").await, 31);
    // as_of ten days later: days 0..=20.
    assert_eq!(
        count_as_of(Some(JAN_1_2026 + 10 * DAY), "signup >= NOW - 30d").await,
        21
    );
    assert_eq!(count_as_of(None, "signup > NOW").await, 0);
    assert_eq!(
        count_as_of(None, "signup BETWEEN NOW - 10d AND NOW - 5d").await,
        6
    );
    // The tree form of NOW - 30d.
    let now_minus_30d = pb::Value {
        kind: Some(pb::value::Kind::Now(pb::RelativeTime {
            amount: 30,
            unit: pb::DurationUnit::Days as i32,
            subtract: true,
        })),
    };
    assert_eq!(
        count(
            &server,
            "",
            tree(node::compare("signup", CompareOp::Ge, now_minus_30d))
        )
        .await,
        31
    );
    // Moving the server clock moves the default.
    clock.advance(Duration::from_secs(5 * 86_400));
    assert_eq!(count_as_of(None, "signup >= NOW - 30d").await, 26);
    // An RFC 3339 literal compares with the timestamp attribute (2025-12-02 is 30 days back).
    assert_eq!(
        count_as_of(None, r#"signup >= "2025-12-02T00:00:00Z""#).await,
        31
    );
    server.shutdown().await;
}

#[tokio::test]
async fn datasets_are_independent() {
    let (server, everyone) = server_with_people(60).await;
    let other = people(7);
    load_people(&server, "eu-brand", &other).await;
    assert_eq!(
        count(&server, "", text("age IS NOT NULL OR age IS NULL")).await,
        60
    );
    assert_eq!(
        count(&server, "eu-brand", text("age IS NOT NULL OR age IS NULL")).await,
        7
    );
    assert_eq!(
        count(&server, "default", text(r#"country = "US""#)).await as usize,
        people_where(&everyone, |p| p.country == Some("US")).len()
    );
    assert_eq!(
        members(&server, "eu-brand", text(r#"country = "US""#)).await,
        people_where(&other, |p| p.country == Some("US"))
    );
    // A segment in one dataset is unknown in the other.
    create(&server, "us", r#"country = "US""#).await;
    let status = server
        .query()
        .count(pb::CountRequest {
            dataset: "eu-brand".into(),
            audience: segment_audience("us"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["us"]);
    server.shutdown().await;
}

#[tokio::test]
async fn health_turns_serving_when_ready_and_the_port_closes_after_shutdown() {
    let (server, gate) = TestServer::start_gated(ServerOptions::default()).await;
    assert_eq!(server.health("").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(
        server.health("audience.v1.QueryService").await.unwrap(),
        ServingStatus::NotServing
    );
    gate.open();
    server.wait_until_serving().await;
    for service in [
        "",
        "audience.v1.QueryService",
        "audience.v1.SegmentService",
        "audience.v1.IngestService",
        "audience.v1.SchemaService",
        "audience.v1.WatchService",
    ] {
        assert_eq!(
            server.health(service).await.unwrap(),
            ServingStatus::Serving,
            "{service}"
        );
    }
    let unknown = server.health("no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let addr = server.socket_addr();
    server.shutdown().await;
    let connect = tokio::time::timeout(HARD_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect attempt finishes");
    assert!(connect.is_err(), "nothing listens on {addr} after shutdown");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::start().await;
    // Both versions: older tools (Postman, some grpcurl builds) ask only for v1alpha.
    let v1 = reflected_services_v1(server.channel(), None).await.unwrap();
    let v1alpha = reflected_services_v1alpha(server.channel(), None)
        .await
        .unwrap();
    assert_eq!(v1, v1alpha);
    assert!(
        v1.contains("grpc.reflection.v1alpha.ServerReflection"),
        "{v1:?}"
    );
    assert!(v1.contains("grpc.reflection.v1.ServerReflection"), "{v1:?}");
    let mut client = ServerReflectionClient::new(server.channel());
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "audience.v1.QueryService".into(),
            )),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "audience.v1.QueryService",
        "audience.v1.SegmentService",
        "audience.v1.IngestService",
        "audience.v1.SchemaService",
        "audience.v1.WatchService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    let second = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("expected file descriptors, got {second:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    drop(responses);
    server.shutdown().await;
}
