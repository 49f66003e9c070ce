//! SegmentService over the wire: CRUD, labels, materialized sizes kept current by writes,
//! references between segments, cycles and deletion of referenced segments.

use std::collections::HashMap;
use std::time::Duration;

use audience::grpc::pb;
use pb::CompareOp;
use tonic::Code;

use crate::harness::node::{self, i, lit, s};
use crate::harness::*;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn create(
    server: &TestServer,
    id: &str,
    expression: pb::Expression,
    label_pairs: &[(&str, &str)],
) -> Result<pb::Segment, tonic::Status> {
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: id.into(),
            labels: labels(label_pairs),
            expression: Some(expression),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().segment.expect("segment in response"))
}

async fn get(server: &TestServer, id: &str) -> Result<pb::Segment, tonic::Status> {
    server
        .segments()
        .get_segment(pb::GetSegmentRequest {
            segment_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().segment.expect("segment in response"))
}

async fn update(
    server: &TestServer,
    request: pb::UpdateSegmentRequest,
) -> Result<pb::Segment, tonic::Status> {
    server
        .segments()
        .update_segment(request)
        .await
        .map(|r| r.into_inner().segment.expect("segment in response"))
}

async fn list(server: &TestServer, filter: &[(&str, &str)]) -> Vec<String> {
    server
        .segments()
        .list_segments(pb::ListSegmentsRequest {
            label_filter: labels(filter),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segments
        .into_iter()
        .map(|s| s.id)
        .collect()
}

async fn delete(server: &TestServer, id: &str) -> Result<(), tonic::Status> {
    server
        .segments()
        .delete_segment(pb::DeleteSegmentRequest {
            segment_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn ts(millis: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: millis / 1000,
        nanos: 0,
    })
}

#[tokio::test]
async fn create_get_update_delete_round_trip() {
    let clock = FixedClock::new(JAN_1_2026);
    let server = TestServer::start_with(ServerOptions::default().clock(clock.clone())).await;
    let everyone = people(150);
    load_people(&server, "", &everyone).await;

    let created = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "us_young".into(),
            name: "US under 30".into(),
            description: "for the spring campaign".into(),
            labels: labels(&[("team", "growth"), ("region", "na")]),
            expression: Some(text_expr(r#"country = "US" AND age < 30"#)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    let expected = people_where(&everyone, |p| {
        p.country == Some("US") && p.age.is_some_and(|a| a < 30)
    });
    assert!(!expected.is_empty());
    assert_eq!(created.id, "us_young");
    assert_eq!(created.name, "US under 30");
    assert_eq!(created.description, "for the spring campaign");
    assert_eq!(
        created.labels,
        labels(&[("team", "growth"), ("region", "na")])
    );
    assert_eq!(created.size, expected.len() as u64);
    assert_eq!(created.create_time, ts(JAN_1_2026));
    assert_eq!(created.update_time, ts(JAN_1_2026));
    // Both forms of the definition come back; the tree is exactly the parsed text.
    assert_eq!(
        created.expression_tree,
        Some(node::and(vec![
            node::eq("country", s("US")),
            node::compare("age", CompareOp::Lt, lit(i(30))),
        ]))
    );
    let canonical = created.expression_text.clone();
    assert_eq!(
        members(&server, "", text(&canonical)).await,
        expected,
        "the canonical text {canonical} means the same"
    );
    assert_eq!(get(&server, "us_young").await.unwrap(), created);

    // A name defaults to the id; a tree definition comes back unchanged.
    let tree_def = node::or(vec![
        node::has("interests", s("tech")),
        node::is_null("country", false),
    ]);
    let by_tree = create(&server, "tech_or_unknown", tree_expr(tree_def.clone()), &[])
        .await
        .unwrap();
    assert_eq!(by_tree.name, "tech_or_unknown");
    assert_eq!(by_tree.expression_tree, Some(tree_def));
    assert_eq!(
        by_tree.size as usize,
        people_where(&everyone, |p| p.has("tech") || p.country.is_none()).len()
    );

    // Update the name only: the rest stays, update_time moves, create_time does not.
    clock.advance(Duration::from_secs(3600));
    let renamed = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "us_young".into(),
            name: Some("Young Americans".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(renamed.name, "Young Americans");
    assert_eq!(renamed.description, created.description);
    assert_eq!(renamed.labels, created.labels);
    assert_eq!(renamed.expression_text, created.expression_text);
    assert_eq!(renamed.size, created.size);
    assert_eq!(renamed.create_time, ts(JAN_1_2026));
    assert_eq!(renamed.update_time, ts(JAN_1_2026 + 3_600_000));

    // Labels merge by default and replace on request.
    let merged = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "us_young".into(),
            labels: labels(&[("team", "brand"), ("tier", "gold")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        merged.labels,
        labels(&[("team", "brand"), ("region", "na"), ("tier", "gold")])
    );
    let replaced = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "us_young".into(),
            labels: labels(&[("owner", "ana")]),
            replace_labels: true,
            description: Some(String::new()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(replaced.labels, labels(&[("owner", "ana")]));
    assert_eq!(replaced.description, "");
    assert_eq!(replaced.name, "Young Americans");

    // A new expression recomputes the members.
    let redefined = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "us_young".into(),
            expression: Some(text_expr(r#"country = "GB" AND age < 30"#)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let gb_young = people_where(&everyone, |p| {
        p.country == Some("GB") && p.age.is_some_and(|a| a < 30)
    });
    assert_eq!(redefined.size, gb_young.len() as u64);
    assert_eq!(
        members(&server, "", segment_audience("us_young")).await,
        gb_young
    );

    // Delete: gone from get, list and counts.
    delete(&server, "us_young").await.unwrap();
    assert_status(
        &get(&server, "us_young").await.unwrap_err(),
        Code::NotFound,
        &["us_young"],
    );
    assert_eq!(list(&server, &[]).await, vec!["tech_or_unknown"]);
    assert_status(
        &delete(&server, "us_young").await.unwrap_err(),
        Code::NotFound,
        &["us_young"],
    );
    let status = server
        .query()
        .count(pb::CountRequest {
            audience: segment_audience("us_young"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["us_young"]);
    server.shutdown().await;
}

#[tokio::test]
async fn list_filters_by_every_label_given() {
    let (server, _) = server_with_people(20).await;
    let all = text_expr("age IS NOT NULL");
    create(
        &server,
        "a",
        all.clone(),
        &[("team", "growth"), ("env", "prod")],
    )
    .await
    .unwrap();
    create(
        &server,
        "b",
        all.clone(),
        &[("team", "growth"), ("env", "test")],
    )
    .await
    .unwrap();
    create(
        &server,
        "c",
        all.clone(),
        &[("team", "brand"), ("env", "prod")],
    )
    .await
    .unwrap();
    create(&server, "d", all.clone(), &[]).await.unwrap();
    assert_eq!(list(&server, &[]).await, vec!["a", "b", "c", "d"]);
    assert_eq!(list(&server, &[("team", "growth")]).await, vec!["a", "b"]);
    assert_eq!(list(&server, &[("env", "prod")]).await, vec!["a", "c"]);
    assert_eq!(
        list(&server, &[("team", "growth"), ("env", "prod")]).await,
        vec!["a"]
    );
    assert!(list(&server, &[("team", "legal")]).await.is_empty());
    assert!(list(&server, &[("owner", "growth")]).await.is_empty());
    server.shutdown().await;
}

/// A segment's size and members, checked against the rows.
async fn assert_segment(server: &TestServer, id: &str, expected: Vec<String>) {
    let segment = get(server, id).await.unwrap();
    assert_eq!(segment.size, expected.len() as u64, "size of {id}");
    assert_eq!(
        members(server, "", segment_audience(id)).await,
        expected,
        "members of {id}"
    );
}

#[tokio::test]
async fn sizes_stay_current_through_upserts_and_deletes() {
    let (server, mut rows) = server_with_people(120).await;
    create(&server, "us", text_expr(r#"country = "US""#), &[])
        .await
        .unwrap();
    create(
        &server,
        "us_young",
        text_expr(r#"SEGMENT "us" AND age < 30"#),
        &[],
    )
    .await
    .unwrap();
    create(&server, "not_us", text_expr(r#"NOT SEGMENT "us""#), &[])
        .await
        .unwrap();
    create(
        &server,
        "sporty",
        text_expr(r#"interests HAS "sports""#),
        &[],
    )
    .await
    .unwrap();

    async fn check(server: &TestServer, rows: &[Person]) {
        assert_segment(
            server,
            "us",
            people_where(rows, |p| p.country == Some("US")),
        )
        .await;
        assert_segment(
            server,
            "us_young",
            people_where(rows, |p| {
                p.country == Some("US") && p.age.is_some_and(|a| a < 30)
            }),
        )
        .await;
        assert_segment(
            server,
            "not_us",
            people_where(rows, |p| p.country != Some("US")),
        )
        .await;
        assert_segment(server, "sporty", people_where(rows, |p| p.has("sports"))).await;
    }
    check(&server, &rows).await;

    // Move some users into the US, clear ages, add sports, create new users.
    let mut ingest = server.ingest();
    let mut users = Vec::new();
    for person in rows.iter_mut().filter(|p| p.country == Some("GB")).take(5) {
        person.country = Some("US");
        person.age = Some(21);
        users.push(update::user(
            &person.id,
            vec![update::string("country", "US"), update::int("age", 21)],
        ));
    }
    for person in rows
        .iter_mut()
        .filter(|p| p.country == Some("US") && p.age.is_some())
        .skip(10)
        .take(4)
    {
        person.age = None;
        users.push(update::user(&person.id, vec![update::clear("age")]));
    }
    for person in rows.iter_mut().filter(|p| !p.has("sports")).take(6) {
        person.interests.push("sports");
        users.push(update::user(
            &person.id,
            vec![update::add("interests", &["sports"])],
        ));
    }
    for n in 0..3 {
        let person = Person {
            id: format!("new{n}"),
            country: Some("US"),
            age: Some(20 + n),
            interests: vec![],
            subscriber: None,
            spend: None,
        };
        users.push(update::user(
            &person.id,
            vec![update::string("country", "US"), update::int("age", 20 + n)],
        ));
        rows.push(person);
    }
    ingest
        .upsert_users(pb::UpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .unwrap();
    check(&server, &rows).await;

    // A batch touching most users (re-evaluated over everyone rather than within the batch).
    let mut users = Vec::new();
    for (k, person) in rows.iter_mut().enumerate() {
        let mut updates = Vec::new();
        if k % 3 == 0 {
            person.country = Some("US");
            updates.push(update::string("country", "US"));
        }
        if k % 4 == 1 {
            person.age = Some(19);
            updates.push(update::int("age", 19));
        }
        users.push(update::user(&person.id, updates));
    }
    for chunk in users.chunks(100) {
        ingest
            .upsert_users(pb::UpsertUsersRequest {
                users: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    check(&server, &rows).await;

    // Delete some members of every segment.
    let gone: Vec<String> = rows
        .iter()
        .filter(|p| p.country == Some("US"))
        .step_by(4)
        .chain(rows.iter().filter(|p| p.country != Some("US")).step_by(9))
        .map(|p| p.id.clone())
        .collect();
    let response = ingest
        .delete_users(pb::DeleteUsersRequest {
            user_ids: gone.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.deleted, gone.len() as u64);
    rows.retain(|p| !gone.contains(&p.id));
    check(&server, &rows).await;

    // Redefining a referenced segment brings its dependents along.
    update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "us".into(),
            expression: Some(text_expr(r#"country = "GB""#)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_segment(
        &server,
        "us_young",
        people_where(&rows, |p| {
            p.country == Some("GB") && p.age.is_some_and(|a| a < 30)
        }),
    )
    .await;
    assert_segment(
        &server,
        "not_us",
        people_where(&rows, |p| p.country != Some("GB")),
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn duplicate_ids_are_already_exists_and_leave_the_first() {
    let (server, everyone) = server_with_people(40).await;
    create(&server, "us", text_expr(r#"country = "US""#), &[])
        .await
        .unwrap();
    let status = create(&server, "us", text_expr(r#"country = "GB""#), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::AlreadyExists, &["us"]);
    let kept = get(&server, "us").await.unwrap();
    assert_eq!(
        kept.size as usize,
        people_where(&everyone, |p| p.country == Some("US")).len()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn references_that_form_a_cycle_are_invalid_and_change_nothing() {
    let (server, everyone) = server_with_people(40).await;
    // A segment naming itself.
    let status = create(&server, "selfish", text_expr(r#"SEGMENT "selfish""#), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["cycle", "selfish"]);
    assert_status(
        &get(&server, "selfish").await.unwrap_err(),
        Code::NotFound,
        &[],
    );

    // a <- b <- c, then a redefined to need c.
    create(&server, "a", text_expr(r#"country = "US""#), &[])
        .await
        .unwrap();
    create(&server, "b", text_expr(r#"SEGMENT "a" AND age < 40"#), &[])
        .await
        .unwrap();
    create(&server, "c", text_expr(r#"SEGMENT "b" OR age > 60"#), &[])
        .await
        .unwrap();
    let status = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "a".into(),
            expression: Some(tree_expr(node::segment("c"))),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["cycle", "a", "b", "c"]);
    let a = get(&server, "a").await.unwrap();
    assert_eq!(a.expression_tree, Some(node::eq("country", s("US"))));
    assert_eq!(
        a.size as usize,
        people_where(&everyone, |p| p.country == Some("US")).len()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_referenced_segment_fails_naming_who_uses_it() {
    let (server, _) = server_with_people(30).await;
    create(&server, "base", text_expr(r#"country = "US""#), &[])
        .await
        .unwrap();
    create(
        &server,
        "user1",
        text_expr(r#"SEGMENT "base" AND age < 30"#),
        &[],
    )
    .await
    .unwrap();
    create(&server, "user2", text_expr(r#"NOT SEGMENT "base""#), &[])
        .await
        .unwrap();
    let status = delete(&server, "base").await.unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["base", "user1", "user2"],
    );
    assert!(get(&server, "base").await.is_ok(), "still there");
    // Once nothing references it, it can go.
    delete(&server, "user1").await.unwrap();
    delete(&server, "user2").await.unwrap();
    delete(&server, "base").await.unwrap();
    assert!(list(&server, &[]).await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn bad_definitions_are_refused_with_the_field() {
    let (server, _) = server_with_people(10).await;
    let status = create(&server, "bad id!", text_expr("age > 1"), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["bad id!"]);
    let status = create(&server, "", text_expr("age > 1"), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["segment_id"]);
    let status = server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "no_expr".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["expression"]);
    let status = create(&server, "ghost", text_expr(r#"SEGMENT "nope""#), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["nope"]);
    let status = create(&server, "typo", text_expr("agee > 1"), &[])
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["expression", "agee"]);
    let status = update(
        &server,
        pb::UpdateSegmentRequest {
            segment_id: "missing".into(),
            name: Some("x".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_status(&status, Code::NotFound, &["missing"]);
    assert!(list(&server, &[]).await.is_empty(), "nothing was created");
    server.shutdown().await;
}

#[tokio::test]
async fn segments_relative_to_now_follow_the_clock() {
    let clock = FixedClock::new(JAN_1_2026);
    // A short refresh period: the saved segment catches up with the clock with no write.
    let server = TestServer::start_on_clock(clock.clone()).await;
    const DAY: i64 = 86_400_000;
    let users = (0..20)
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
    create(&server, "recent", text_expr("signup >= NOW - 7d"), &[])
        .await
        .unwrap();
    assert_eq!(get(&server, "recent").await.unwrap().size, 8);
    // Ten days later nobody signed up within the last week.
    clock.advance(Duration::from_secs(10 * 86_400));
    assert_eq!(count(&server, "", text("signup >= NOW - 7d")).await, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get(&server, "recent").await.unwrap().size != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saved segment did not follow the clock within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&server, "", segment_audience("recent")).await,
        0,
        "the saved segment agrees with its own expression"
    );
    let mut query = server.query();
    let u00 = query
        .segments_for_user(pb::SegmentsForUserRequest {
            dataset: String::new(),
            user_id: "u00".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u00.segment_ids.is_empty());
    // Moving the clock back to the first days brings the latest signups back.
    clock.set(JAN_1_2026 + 2 * DAY);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get(&server, "recent").await.unwrap().size != 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saved segment did not follow the clock back within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&server, "", text("signup >= NOW - 7d")).await, 6);
    server.shutdown().await;
}

#[tokio::test]
async fn chains_of_segment_references_are_bounded() {
    let (server, _) = server_with_people(20).await;
    create(&server, "s0", text_expr(r#"country = "US""#), &[])
        .await
        .unwrap();
    for depth in 1..=32 {
        let expr = format!(r#"SEGMENT "s{}""#, depth - 1);
        create(&server, &format!("s{depth}"), text_expr(&expr), &[])
            .await
            .unwrap();
    }
    let error = create(&server, "s33", text_expr(r#"SEGMENT "s32""#), &[])
        .await
        .unwrap_err();
    assert_status(
        &error,
        Code::ResourceExhausted,
        &["depth of SEGMENT references", "33", "32"],
    );
    assert_eq!(
        get(&server, "s33").await.unwrap_err().code(),
        Code::NotFound
    );
    // Deepening the chain from its root is refused too.
    let error = server
        .segments()
        .update_segment(pb::UpdateSegmentRequest {
            segment_id: "s0".into(),
            expression: Some(text_expr(r#"SEGMENT "extra""#)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    create(&server, "extra", text_expr("age > 1"), &[])
        .await
        .unwrap();
    let error = server
        .segments()
        .update_segment(pb::UpdateSegmentRequest {
            segment_id: "s0".into(),
            expression: Some(text_expr(r#"SEGMENT "extra""#)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &error,
        Code::ResourceExhausted,
        &["depth of SEGMENT references"],
    );
}
