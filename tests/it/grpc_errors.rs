//! Every case of PRODUCT.md "Errors and limits" over gRPC: the precise code, the field named in
//! the message, nothing applied, and a server that keeps serving afterwards.

use std::time::Duration;

use audience::engine::Limits;
use audience::grpc::pb;
use pb::CompareOp;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::node::{self, i, lit, s};
use crate::harness::*;

async fn count_status(server: &TestServer, audience: Option<pb::Audience>) -> tonic::Status {
    server
        .query()
        .count(pb::CountRequest {
            audience,
            ..Default::default()
        })
        .await
        .expect_err("the count should be refused")
}

/// The server answers and reports SERVING: no error took it down.
async fn assert_still_serving(server: &TestServer) {
    assert_eq!(server.health("").await.unwrap(), ServingStatus::Serving);
}

fn small_limits() -> Limits {
    Limits {
        max_expression_nodes: 10,
        max_expression_depth: 4,
        max_batch_users: 10,
        max_page_size: 50,
        max_overlap_audiences: 3,
        max_segments: 2,
        ..Limits::default()
    }
}

#[tokio::test]
async fn syntax_errors_give_line_column_and_what_was_expected() {
    let (server, _) = server_with_people(10).await;
    let status = count_status(&server, text("age = AND x")).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &[
            "audience.expression.text",
            "1:7",
            "expected a value after '='",
            "AND",
        ],
    );
    let status = count_status(&server, text("age > 1\nAND country =")).await;
    assert_status(&status, Code::InvalidArgument, &["2:14", "end of input"]);
    let status = count_status(&server, text(r#"(age > 1 OR country = "US""#)).await;
    assert_status(&status, Code::InvalidArgument, &["')'", "1:1"]);
    let status = count_status(&server, text(r#"country = "US"#)).await;
    assert_status(&status, Code::InvalidArgument, &["1:11"]);
    let status = count_status(&server, text("")).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["1:1", "expected an expression"],
    );
    // The same in a segment definition names the request's own field.
    let status = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "s".into(),
            expression: Some(text_expr("age >")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["expression.text", "1:6"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn names_and_kinds_are_checked_against_the_dataset() {
    let (server, _) = server_with_people(10).await;
    let cases: Vec<(Option<pb::Audience>, &[&str])> = vec![
        (text("agee > 3"), &["audience", "unknown attribute", "agee"]),
        (
            tree(node::and(vec![
                node::eq("country", s("US")),
                node::is_null("nope", false),
            ])),
            &["audience", "unknown attribute", "nope"],
        ),
        (text(r#"age = "old""#), &["age", "integer"]),
        (text(r#"age BETWEEN "a" AND "b""#), &["age", "integer"]),
        (
            tree(node::compare("spend", CompareOp::Gt, lit(s("lots")))),
            &["spend", "float"],
        ),
        (text("country = 5"), &["country", "categorical"]),
        (text("subscriber = 1"), &["subscriber", "boolean"]),
        (text("interests < 3"), &["interests", "set"]),
        (text("age >= NOW - 1d"), &["age", "NOW"]),
        (text(r#"age HAS "x""#), &["age", "HAS"]),
    ];
    for (audience, needles) in cases {
        let status = count_status(&server, audience).await;
        assert_status(&status, Code::InvalidArgument, needles);
    }
    // A bad timestamp literal is named.
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user("t", vec![update::timestamp("signup", 0)])],
            ..Default::default()
        })
        .await
        .unwrap();
    let status = count_status(&server, text(r#"signup > "yesterday""#)).await;
    assert_status(&status, Code::InvalidArgument, &["yesterday", "RFC 3339"]);
    // A breakdown by an unknown attribute.
    let status = server
        .query()
        .count(pb::CountRequest {
            audience: text("age > 1"),
            breakdown_attribute: "colour".into(),
            breakdown_limit: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["colour"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_segments_are_not_found_by_name() {
    let (server, _) = server_with_people(10).await;
    let status = count_status(&server, segment_audience("ghost")).await;
    assert_status(&status, Code::NotFound, &["ghost"]);
    let status = count_status(&server, text(r#"age > 1 AND SEGMENT "phantom""#)).await;
    assert_status(&status, Code::NotFound, &["phantom"]);
    let status = count_status(&server, tree(node::segment("wraith"))).await;
    assert_status(&status, Code::NotFound, &["wraith"]);
    let status = server
        .query()
        .check_membership(pb::CheckMembershipRequest {
            user_id: "p0001".into(),
            segment_ids: vec!["spectre".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["spectre"]);
    let status = server
        .query()
        .overlap(pb::OverlapRequest {
            audiences: vec![text("age > 1").unwrap(), segment_audience("shade").unwrap()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["shade"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_datasets_are_not_found_and_bad_names_invalid() {
    let (server, _) = server_with_people(5).await;
    let audience = text("age > 1");
    for (dataset, code) in [
        ("nowhere", Code::NotFound),
        ("bad name!", Code::InvalidArgument),
        (&"x".repeat(65) as &str, Code::InvalidArgument),
    ] {
        let dataset = dataset.to_owned();
        let mut query = server.query();
        let mut statuses = vec![
            query
                .count(pb::CountRequest {
                    dataset: dataset.clone(),
                    audience: audience.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            query
                .list_members(pb::ListMembersRequest {
                    dataset: dataset.clone(),
                    audience: audience.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            query
                .export_members(pb::ExportMembersRequest {
                    dataset: dataset.clone(),
                    audience: audience.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            query
                .sample_members(pb::SampleMembersRequest {
                    dataset: dataset.clone(),
                    audience: audience.clone(),
                    size: 1,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            query
                .overlap(pb::OverlapRequest {
                    dataset: dataset.clone(),
                    audiences: vec![audience.clone().unwrap(), audience.clone().unwrap()],
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            query
                .segments_for_user(pb::SegmentsForUserRequest {
                    dataset: dataset.clone(),
                    user_id: "u".into(),
                })
                .await
                .unwrap_err(),
            query
                .check_membership(pb::CheckMembershipRequest {
                    dataset: dataset.clone(),
                    user_id: "u".into(),
                    segment_ids: vec!["s".into()],
                })
                .await
                .unwrap_err(),
            server
                .schema()
                .describe_dataset(pb::DescribeDatasetRequest {
                    dataset: dataset.clone(),
                })
                .await
                .unwrap_err(),
            server
                .segments()
                .get_segment(pb::GetSegmentRequest {
                    dataset: dataset.clone(),
                    segment_id: "s".into(),
                })
                .await
                .unwrap_err(),
            server
                .segments()
                .list_segments(pb::ListSegmentsRequest {
                    dataset: dataset.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            server
                .segments()
                .delete_segment(pb::DeleteSegmentRequest {
                    dataset: dataset.clone(),
                    segment_id: "s".into(),
                })
                .await
                .unwrap_err(),
            server
                .ingest()
                .delete_users(pb::DeleteUsersRequest {
                    dataset: dataset.clone(),
                    user_ids: vec!["u".into()],
                })
                .await
                .unwrap_err(),
        ];
        if code == Code::InvalidArgument {
            // Writes create a dataset, but not one with an invalid name.
            statuses.push(
                server
                    .ingest()
                    .upsert_users(pb::UpsertUsersRequest {
                        dataset: dataset.clone(),
                        users: vec![update::user("u", vec![])],
                    })
                    .await
                    .unwrap_err(),
            );
            statuses.push(
                server
                    .schema()
                    .declare_attributes(pb::DeclareAttributesRequest {
                        dataset: dataset.clone(),
                        attributes: vec![pb::AttributeDeclaration {
                            name: "a".into(),
                            kind: pb::AttributeKind::Boolean as i32,
                        }],
                    })
                    .await
                    .unwrap_err(),
            );
            statuses.push(
                server
                    .segments()
                    .create_segment(pb::CreateSegmentRequest {
                        dataset: dataset.clone(),
                        segment_id: "s".into(),
                        expression: Some(text_expr("a = TRUE")),
                        ..Default::default()
                    })
                    .await
                    .unwrap_err(),
            );
            statuses.push(
                import_chunks(
                    &server,
                    &dataset,
                    "",
                    vec![ipc_stream_bytes(
                        &audience::demo::batches(3, 3, 1).collect::<Vec<_>>(),
                    )],
                )
                .await
                .error()
                .clone(),
            );
        }
        for (n, status) in statuses.iter().enumerate() {
            assert_eq!(
                status.code(),
                code,
                "call {n} on dataset {dataset:?}: {}",
                status.message()
            );
            assert!(
                status.message().contains("dataset"),
                "call {n}: {}",
                status.message()
            );
        }
    }
    let datasets = dataset_names(&server).await;
    assert_eq!(datasets, vec!["default"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn expressions_over_the_node_limit_are_resource_exhausted() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(20)).await;
    // OR of n predicates: n + 1 nodes.
    let preds = |n: i64| -> Vec<pb::Node> { (0..n).map(|k| node::eq("age", i(20 + k))).collect() };
    let text_of = |n: i64| -> String {
        (0..n)
            .map(|k| format!("age = {}", 20 + k))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    // At the limit: fine.
    count(&server, "", tree(node::or(preds(9)))).await;
    count(&server, "", text(&text_of(9))).await;
    // Over it, as a tree and as text, in a query and in a segment.
    let status = count_status(&server, tree(node::or(preds(10)))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.tree", "11 nodes", "limit of 10"],
    );
    let status = count_status(&server, text(&text_of(10))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.text", "11 nodes", "limit of 10"],
    );
    let status = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "big".into(),
            expression: Some(tree_expr(node::or(preds(10)))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["expression", "limit of 10"],
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn list_values_count_against_the_node_limit_and_huge_texts_stop_early() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(20)).await;
    let ages = |n: i64| -> Vec<pb::Literal> { (0..n).map(|k| i(20 + k)).collect() };
    let listed = |n: i64| -> String {
        let values: Vec<String> = (0..n).map(|k| (20 + k).to_string()).collect();
        format!("age IN ({})", values.join(", "))
    };
    // A predicate and 9 values: 10 nodes, the limit.
    count(&server, "", text(&listed(9))).await;
    count(&server, "", tree(node::in_("age", ages(9)))).await;
    let status = count_status(&server, text(&listed(10))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.text", "11 nodes", "limit of 10"],
    );
    let status = count_status(&server, tree(node::in_("age", ages(10)))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.tree", "11 nodes", "limit of 10"],
    );
    // 4 MB of list: refused by its first 160 tokens (16 per node), whatever follows.
    let huge = format!("age IN ({}1)", "1, ".repeat(1_400_000));
    let status = count_status(&server, text(&huge)).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.text", "longer than 160 tokens"],
    );
    let status = count_status(&server, tree(node::in_("age", ages(200_000)))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.tree", "limit of 10"],
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn datasets_past_the_limit_are_refused_and_the_others_stay_writable() {
    let limits = Limits {
        max_datasets: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    // `default` exists from the start: one more may be made.
    load_people(&server, "ads-a", &people(3)).await;
    let status = server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            dataset: "ads-b".into(),
            users: vec![pb::UserUpdate {
                user_id: "u1".into(),
                updates: vec![],
            }],
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["the number of datasets", "3", "2"],
    );
    load_people(&server, "ads-a", &people(5)).await;
    let names = server
        .schema()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names.datasets.len(), 2, "{names:?}");
    server.shutdown().await;
}

fn nested_nots(depth: usize) -> pb::Node {
    let mut tree = node::compare("age", CompareOp::Gt, lit(i(1)));
    for _ in 1..depth {
        tree = node::not(tree);
    }
    tree
}

#[tokio::test]
async fn trees_over_the_depth_limit_are_resource_exhausted() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(20)).await;
    count(&server, "", tree(nested_nots(4))).await;
    let status = count_status(&server, tree(nested_nots(5))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.tree", "5 levels", "limit of 4"],
    );
    let status = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "deep".into(),
            expression: Some(tree_expr(nested_nots(5))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["expression", "limit of 4"],
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]

async fn text_over_the_depth_limit_is_resource_exhausted_like_a_tree() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(20)).await;
    count(&server, "", text("NOT NOT NOT age > 1")).await;
    let status = count_status(&server, text("NOT NOT NOT NOT NOT age > 1")).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audience.expression.text", "limit of 4"],
    );
    server.shutdown().await;
}

#[tokio::test]
async fn text_over_the_depth_limit_is_refused_with_its_position() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(20)).await;
    let status = count_status(&server, text("NOT NOT NOT NOT NOT age > 1")).await;
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::ResourceExhausted
        ),
        "{status:?}"
    );
    assert!(status.message().contains("audience.expression.text"));
    assert!(
        status.message().contains('4'),
        "names the limit: {}",
        status.message()
    );
    // Parentheses count as nesting too, and hostile depth is refused without a crash.
    let hostile = format!("{}age > 1{}", "(".repeat(5_000), ")".repeat(5_000));
    let status = count_status(&server, text(&hostile)).await;
    assert!(matches!(
        status.code(),
        Code::InvalidArgument | Code::ResourceExhausted
    ));
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]

async fn trees_deeper_than_protobuf_decoding_allows_are_refused_cleanly() {
    let server = TestServer::start().await;
    load_people(&server, "", &people(5)).await;
    let status = count_status(&server, tree(nested_nots(200))).await;
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::ResourceExhausted
        ),
        "a hostile tree is bad input, not an internal error: {status:?}"
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn batches_and_pages_over_their_limits_are_resource_exhausted() {
    let server = TestServer::start_with(ServerOptions::default().limits(small_limits())).await;
    load_people(&server, "", &people(10)).await;
    let eleven: Vec<pb::UserUpdate> = (0..11)
        .map(|k| update::user(&format!("n{k}"), vec![update::string("country", "US")]))
        .collect();
    let status = server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: eleven,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["batch", "11", "limit of 10"],
    );
    let status = server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            user_ids: (0..11).map(|k| format!("p{k:04}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["batch", "11", "limit of 10"],
    );
    assert_eq!(
        count(&server, "", text("age IS NULL OR age IS NOT NULL")).await,
        10
    );

    let mut query = server.query();
    let status = query
        .list_members(pb::ListMembersRequest {
            audience: text("age > 1"),
            page_size: 51,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["page_size", "51", "limit of 50"],
    );
    let status = query
        .sample_members(pb::SampleMembersRequest {
            audience: text("age > 1"),
            size: 51,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["size", "51", "limit of 50"],
    );
    let status = query
        .export_members(pb::ExportMembersRequest {
            audience: text("age > 1"),
            chunk_size: 51,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["chunk_size", "51", "limit of 50"],
    );
    // At the limit: fine.
    query
        .list_members(pb::ListMembersRequest {
            audience: text("age > 1"),
            page_size: 50,
            ..Default::default()
        })
        .await
        .unwrap();

    let four = vec![text("age > 1").unwrap(); 4];
    let status = query
        .overlap(pb::OverlapRequest {
            audiences: four,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["audiences", "limit of 3"],
    );
    let status = query
        .overlap(pb::OverlapRequest {
            audiences: vec![text("age > 1").unwrap()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["audiences"]);

    // The segment limit.
    for id in ["one", "two"] {
        server
            .segments()
            .create_segment(pb::CreateSegmentRequest {
                segment_id: id.into(),
                expression: Some(text_expr("age > 1")),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let status = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "three".into(),
            expression: Some(text_expr("age > 1")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["segments", "limit of 2"],
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

/// An upsert of about `bytes` bytes on the wire.
fn large_upsert(bytes: usize) -> pb::UpsertUsersRequest {
    let per_user = 200;
    let users = (0..bytes / per_user)
        .map(|k| {
            update::user(
                &format!("big{k:06}"),
                vec![update::string("note", &"n".repeat(per_user - 30))],
            )
        })
        .collect();
    pb::UpsertUsersRequest {
        users,
        ..Default::default()
    }
}

#[tokio::test]
async fn messages_over_max_message_bytes_are_refused_and_nothing_applied() {
    let server = TestServer::start_with(ServerOptions::default().max_message_bytes(65_536).limits(
        Limits {
            max_batch_users: 100_000,
            ..Limits::default()
        },
    ))
    .await;
    // Under the limit: applied.
    let small = large_upsert(30_000);
    let n = small.users.len() as u64;
    server.ingest().upsert_users(small).await.unwrap();
    let status = server
        .ingest()
        .upsert_users(large_upsert(200_000))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    assert!(status.message().contains("65536"), "{}", status.message());
    assert_eq!(
        count(&server, "", text("note IS NOT NULL")).await,
        n,
        "nothing of the oversize request applied"
    );
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]

async fn messages_over_max_message_bytes_are_resource_exhausted() {
    let server = TestServer::start_with(ServerOptions::default().max_message_bytes(65_536)).await;
    let status = server
        .ingest()
        .upsert_users(large_upsert(200_000))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, &["65536"]);
    server.shutdown().await;
}

#[tokio::test]
async fn responses_over_max_message_bytes_fail_with_a_status() {
    let server = TestServer::start_with(ServerOptions::default().max_message_bytes(65_536)).await;
    load_demo(server.engine(), "default", 10_000, 5_000, 3).await;
    // 10,000 ids of 16 hex digits do not fit in 64 KiB.
    let status = server
        .query()
        .list_members(pb::ListMembersRequest {
            audience: text("age IS NULL OR age IS NOT NULL"),
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    // Smaller pages of the same listing work.
    let page = server
        .query()
        .list_members(pb::ListMembersRequest {
            audience: text("age IS NULL OR age IS NOT NULL"),
            page_size: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.user_ids.len(), 1_000);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_deadline_ends_the_call_instead_of_hanging() {
    let server = TestServer::start().await;
    // An import begun through the engine holds the dataset's writer lock, so an upsert cannot
    // finish before its deadline, however fast the machine.
    let import = server.engine().begin_import("default").await.unwrap();
    let mut request = tonic::Request::new(pb::UpsertUsersRequest {
        users: vec![update::user("late", vec![update::string("country", "US")])],
        ..Default::default()
    });
    request.set_timeout(Duration::from_nanos(1));
    let outcome = tokio::time::timeout(HARD_TIMEOUT, server.ingest().upsert_users(request))
        .await
        .expect("the call ends");
    let status = outcome.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Reads never wait for writers.
    let mut request = tonic::Request::new(pb::ListDatasetsRequest {});
    request.set_timeout(Duration::from_secs(5));
    server.schema().list_datasets(request).await.unwrap();
    // Once the lock is free, the expired write must not land: a later write queues behind it.
    drop(import);
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user(
                "on-time",
                vec![update::string("country", "GB")],
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        members(&server, "", text("country IS NOT NULL")).await,
        vec!["on-time"],
        "the expired upsert was abandoned"
    );

    // A client stream that never sends its first message is ended by its deadline.
    let (sender, receiver) = tokio::sync::mpsc::channel::<pb::ImportUsersRequest>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    request.set_timeout(Duration::from_millis(200));
    let outcome = tokio::time::timeout(HARD_TIMEOUT, server.ingest().import_users(request))
        .await
        .expect("the call ends");
    let status = outcome.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    drop(sender);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_stalled_import_does_not_outlive_its_deadline() {
    let server = TestServer::start().await;
    let (sender, receiver) = tokio::sync::mpsc::channel::<pb::ImportUsersRequest>(4);
    let bytes = ipc_stream_bytes(&audience::demo::batches(10, 10, 1).collect::<Vec<_>>());
    // The schema and one batch, then silence: the stream stays open.
    sender
        .send(pb::ImportUsersRequest {
            arrow_ipc_chunk: bytes[..bytes.len() / 2].to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    request.set_timeout(Duration::from_millis(300));
    let progress = server.ingest().import_users(request).await;
    // Whatever the import answers, its deadline has passed well before this write gives up.
    let mut upsert = tonic::Request::new(pb::UpsertUsersRequest {
        users: vec![update::user("after", vec![])],
        ..Default::default()
    });
    upsert.set_timeout(Duration::from_secs(5));
    let result = server.ingest().upsert_users(upsert).await;
    drop(progress);
    drop(sender);
    assert!(
        result.is_ok(),
        "the write waited on an import past its deadline: {:?}",
        result.err()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn empty_user_ids_are_invalid() {
    let (server, _) = server_with_people(5).await;
    let mut query = server.query();
    let status = query
        .segments_for_user(pb::SegmentsForUserRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["user_id", "empty"]);
    let status = query
        .check_membership(pb::CheckMembershipRequest {
            segment_ids: vec!["s".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["user_id", "empty"]);
    let status = query
        .check_membership(pb::CheckMembershipRequest {
            user_id: "p0001".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["segment_ids"]);
    let status = server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            user_ids: vec!["p0001".into(), String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["user_ids[1]", "empty"]);
    assert_eq!(
        count(&server, "", text("age IS NULL OR age IS NOT NULL")).await,
        5,
        "the valid id in the refused delete stayed"
    );
    let status = server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user("", vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["users[0].user_id"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

fn with_node(inner: pb::node::Node) -> pb::Node {
    pb::Node { node: Some(inner) }
}

#[tokio::test]
async fn malformed_trees_name_the_field_path() {
    let (server, _) = server_with_people(5).await;
    let ok = || node::eq("country", s("US"));
    let prefix = "audience.expression.tree";
    let now_days = |amount: u64, unit: pb::DurationUnit| pb::Value {
        kind: Some(pb::value::Kind::Now(pb::RelativeTime {
            amount,
            unit: unit as i32,
            subtract: false,
        })),
    };
    let cases: Vec<(pb::Node, String)> = vec![
        (
            node::and(vec![
                ok(),
                node::compare("spend", CompareOp::Gt, lit(node::f(f64::NAN))),
            ]),
            format!("{prefix}.and.nodes[1].compare.value.literal"),
        ),
        (
            node::or(vec![ok(), node::eq("spend", node::f(f64::INFINITY))]),
            format!("{prefix}.or.nodes[1].equals.value"),
        ),
        (
            node::and(vec![ok(), pb::Node { node: None }]),
            format!("{prefix}.and.nodes[1]"),
        ),
        (node::not(pb::Node { node: None }), format!("{prefix}.not")),
        (node::and(vec![]), format!("{prefix}.and")),
        (
            node::or(vec![ok(), node::in_("country", vec![])]),
            format!("{prefix}.or.nodes[1].in.values"),
        ),
        (
            node::and(vec![
                ok(),
                node::in_("country", vec![s("US"), pb::Literal { kind: None }]),
            ]),
            format!("{prefix}.and.nodes[1].in.values[1]"),
        ),
        (
            node::and(vec![
                ok(),
                with_node(pb::node::Node::Equals(pb::EqualsPredicate {
                    attribute: "country".into(),
                    value: None,
                    negated: false,
                })),
            ]),
            format!("{prefix}.and.nodes[1].equals.value"),
        ),
        (
            with_node(pb::node::Node::Compare(pb::ComparePredicate {
                attribute: "age".into(),
                op: CompareOp::Unspecified as i32,
                value: Some(lit(i(3))),
            })),
            format!("{prefix}.compare.op"),
        ),
        (
            with_node(pb::node::Node::Compare(pb::ComparePredicate {
                attribute: "age".into(),
                op: CompareOp::Lt as i32,
                value: None,
            })),
            format!("{prefix}.compare.value"),
        ),
        (
            with_node(pb::node::Node::Compare(pb::ComparePredicate {
                attribute: "age".into(),
                op: CompareOp::Lt as i32,
                value: Some(pb::Value { kind: None }),
            })),
            format!("{prefix}.compare.value"),
        ),
        (
            node::between(
                "signup",
                now_days(3, pb::DurationUnit::Unspecified),
                now_days(0, pb::DurationUnit::Unspecified),
            ),
            format!("{prefix}.between.low.now.unit"),
        ),
        (
            with_node(pb::node::Node::Between(pb::BetweenPredicate {
                attribute: "age".into(),
                low: Some(lit(i(1))),
                high: None,
            })),
            format!("{prefix}.between.high"),
        ),
        (node::eq("", s("x")), format!("{prefix}.equals.attribute")),
        (
            node::is_null("", false),
            format!("{prefix}.is_null.attribute"),
        ),
        (
            node::has_any("", vec![s("x")]),
            format!("{prefix}.has_any.attribute"),
        ),
        (
            node::has_all("tags", vec![]),
            format!("{prefix}.has_all.values"),
        ),
        (node::segment(""), format!("{prefix}.segment.segment_id")),
    ];
    for (tree_form, field) in cases {
        let status = count_status(&server, tree(tree_form)).await;
        assert_status(&status, Code::InvalidArgument, &[&field]);
    }
    // Missing oneofs above the tree.
    let status = count_status(&server, None).await;
    assert_status(&status, Code::InvalidArgument, &["audience"]);
    let status = count_status(&server, Some(pb::Audience { kind: None })).await;
    assert_status(&status, Code::InvalidArgument, &["audience"]);
    let status = count_status(
        &server,
        Some(pb::Audience {
            kind: Some(pb::audience::Kind::Expression(pb::Expression {
                kind: None,
            })),
        }),
    )
    .await;
    assert_status(&status, Code::InvalidArgument, &["audience.expression"]);
    let status = count_status(&server, segment_audience("")).await;
    assert_status(&status, Code::InvalidArgument, &["audience.segment_id"]);
    // An as_of with impossible nanos.
    let status = server
        .query()
        .count(pb::CountRequest {
            audience: text("age > 1"),
            as_of: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["as_of"]);
    // Sample sizes must be positive.
    let status = server
        .query()
        .sample_members(pb::SampleMembersRequest {
            audience: text("age > 1"),
            size: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["size"]);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test]

async fn a_failed_write_does_not_create_its_dataset() {
    let server = TestServer::start().await;
    let status = server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            dataset: "brand-new".into(),
            users: vec![
                update::user("a", vec![update::int("age", 1)]),
                update::user("b", vec![update::string("age", "x")]),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let outcome = import_chunks(&server, "brand-newer", "", vec![b"not arrow".to_vec()]).await;
    assert_eq!(outcome.error().code(), Code::InvalidArgument);
    let datasets = dataset_names(&server).await;
    assert_eq!(datasets, vec!["default"], "no trace of the failed writes");
    server.shutdown().await;
}

#[tokio::test]

async fn long_names_echoed_in_errors_still_give_a_precise_status() {
    let (server, _) = server_with_people(5).await;
    let long = "x".repeat(100_000);
    let mut outcomes = Vec::new();
    let status = server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user(&long, vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    outcomes.push(("user id", status.code(), Code::InvalidArgument));
    let status = count_status(&server, text(&format!("{long} = 1"))).await;
    outcomes.push(("attribute", status.code(), Code::InvalidArgument));
    let status = count_status(&server, segment_audience(&long)).await;
    outcomes.push(("segment", status.code(), Code::NotFound));
    let status = server
        .query()
        .count(pb::CountRequest {
            dataset: long.clone(),
            audience: text("age > 1"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    outcomes.push(("dataset", status.code(), Code::InvalidArgument));
    let wrong: Vec<_> = outcomes
        .iter()
        .filter(|(_, got, want)| got != want)
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_still_serving(&server).await;
    server.shutdown().await;
}
