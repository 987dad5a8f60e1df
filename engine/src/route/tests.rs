//! Router unit tests (no PostgreSQL). The shard of a PostgreSQL-hashed key is cross-checked
//! against remainders PostgreSQL 15 itself chose (see `hash.rs` tests); the integration test
//! `tests/route.rs` checks 100k+ keys per type against a live server.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::event::{Column, Relation, ReplicaIdentity};

fn col(name: &str, type_oid: Oid, is_key: bool) -> Column {
    Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    }
}

/// `public.<name> (id bigint PK, account_id bigint [in identity?], body text)`.
fn rel(oid: u32, name: &str, account_in_key: bool, ident: ReplicaIdentity) -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(oid),
        namespace: "public".into(),
        name: name.into(),
        replica_identity: ident,
        columns: vec![
            col("id", 20, true),
            col("account_id", 20, account_in_key),
            col("body", 25, false),
        ],
    })
}

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn row(id: i64, account: &str, body: Value) -> Row {
    vec![t(&id.to_string()), t(account), body]
}

fn spec(shards: usize) -> RouteSpec {
    RouteSpec {
        shards: (0..shards).map(|i| format!("s{i}")).collect(),
        tables: vec![],
        default_key: "account_id".into(),
        hash: HashKind::Postgres,
        unlisted: Unlisted::Auto,
    }
}

fn run(r: &mut Router, c: Change) -> Result<Vec<(ShardId, Change)>, RouteError> {
    let mut out = Vec::new();
    r.route_into(c, &mut out)?;
    Ok(out)
}

/// The shard PostgreSQL picks for an int8 key with `n` partitions, computed independently of
/// the router (hash module only).
fn pg_shard(v: i64, n: u64) -> ShardId {
    let h = hash::row_hash(hash::hashint8extended(v, hash::HASH_PARTITION_SEED));
    ShardId((h % n) as u16)
}

/// Two int8 account ids that land on different shards of `n`.
fn two_accounts_on_different_shards(n: u64) -> (i64, i64) {
    let a = 1;
    let b = (2..).find(|&b| pg_shard(b, n) != pg_shard(a, n)).unwrap();
    (a, b)
}

#[test]
fn insert_goes_to_the_partition_postgres_picks() {
    let mut r = Router::new(spec(8)).unwrap();
    let accounts = rel(1, "accounts", true, ReplicaIdentity::Default);
    // PostgreSQL 15 put bigint 42 in REMAINDER 2 and -1 in REMAINDER 5 of MODULUS 8.
    for (acct, want) in [("42", 2), ("-1", 5), ("9223372036854775807", 6)] {
        let out = run(
            &mut r,
            Change::Insert {
                rel: accounts.clone(),
                new: row(1, acct, t("x")),
            },
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, ShardId(want), "account {acct}");
        assert!(matches!(out[0].1, Change::Insert { .. }));
    }
}

#[test]
fn update_within_a_shard_passes_through() {
    let mut r = Router::new(spec(4)).unwrap();
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let c = Change::Update {
        rel: tbl.clone(),
        old: None,
        new: row(1, "7", Value::UnchangedToast),
    };
    let out = run(&mut r, c.clone()).unwrap();
    assert_eq!(out, vec![(pg_shard(7, 4), c)]);
}

#[test]
fn key_move_becomes_delete_then_insert_with_toast_filled() {
    let mut r = Router::new(spec(4)).unwrap();
    let (a, b) = two_accounts_on_different_shards(4);
    let tbl = rel(1, "events", false, ReplicaIdentity::Full);
    let old = OldRow::Full(row(1, &a.to_string(), t("big body")));
    let c = Change::Update {
        rel: tbl.clone(),
        old: Some(old.clone()),
        new: row(1, &b.to_string(), Value::UnchangedToast),
    };
    let out = run(&mut r, c).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0],
        (
            pg_shard(a, 4),
            Change::Delete {
                rel: tbl.clone(),
                old
            }
        )
    );
    assert_eq!(
        out[1],
        (
            pg_shard(b, 4),
            Change::Insert {
                rel: tbl,
                new: row(1, &b.to_string(), t("big body"))
            }
        )
    );
}

#[test]
fn key_move_without_full_old_row_and_toast_fails_and_emits_nothing() {
    let mut r = Router::new(spec(4)).unwrap();
    let (a, b) = two_accounts_on_different_shards(4);
    // Key in the identity: the old key is sent, but not the old body.
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let c = Change::Update {
        rel: tbl,
        old: Some(OldRow::Key(vec![t("1"), t(&a.to_string()), Value::Null])),
        new: row(1, &b.to_string(), Value::UnchangedToast),
    };
    let mut out = Vec::new();
    let err = r.route_into(c, &mut out).unwrap_err();
    assert!(out.is_empty());
    let msg = err.to_string();
    assert!(msg.contains("public.events"), "{msg}");
    assert!(msg.contains("column body"), "{msg}");
    assert!(
        msg.contains(&format!("changes account_id from {a} to {b}")),
        "{msg}"
    );
    assert!(msg.contains("(row id=1, account_id="), "{msg}");
    assert!(
        msg.contains("ALTER TABLE public.events REPLICA IDENTITY FULL"),
        "{msg}"
    );
}

#[test]
fn key_move_with_key_identity_and_no_toast_moves() {
    let mut r = Router::new(spec(4)).unwrap();
    let (a, b) = two_accounts_on_different_shards(4);
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let old = OldRow::Key(vec![t("1"), t(&a.to_string()), Value::Null]);
    let new = row(1, &b.to_string(), t("body"));
    let out = run(
        &mut r,
        Change::Update {
            rel: tbl.clone(),
            old: Some(old.clone()),
            new: new.clone(),
        },
    )
    .unwrap();
    assert_eq!(
        out,
        vec![
            (
                pg_shard(a, 4),
                Change::Delete {
                    rel: tbl.clone(),
                    old
                }
            ),
            (pg_shard(b, 4), Change::Insert { rel: tbl, new }),
        ]
    );
}

#[test]
fn update_and_delete_need_the_key_in_the_replica_identity() {
    let mut r = Router::new(spec(4)).unwrap();
    let tbl = rel(1, "events", false, ReplicaIdentity::Default);
    let err = run(
        &mut r,
        Change::Update {
            rel: tbl.clone(),
            old: None,
            new: row(5, "7", t("b")),
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        RouteError::KeyNotInReplicaIdentity { op: "update", .. }
    ));
    let err = run(
        &mut r,
        Change::Delete {
            rel: tbl.clone(),
            old: OldRow::Key(vec![t("5"), Value::Null, Value::Null]),
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("delete") && msg.contains("(row id=5)"),
        "{msg}"
    );
    assert!(msg.contains("REPLICA IDENTITY FULL"), "{msg}");
    assert_eq!(
        r.validate_relation(&tbl),
        Err(RouteError::KeyNotInReplicaIdentity {
            table: "public.events".into(),
            column: "account_id".into(),
            op: "update/delete",
            row: String::new(),
        })
    );
    // With the key in the identity, or FULL, it validates and deletes route.
    let ok = rel(2, "events2", true, ReplicaIdentity::Default);
    assert_eq!(r.validate_relation(&ok), Ok(()));
    let full = rel(3, "events3", false, ReplicaIdentity::Full);
    assert_eq!(r.validate_relation(&full), Ok(()));
    let out = run(
        &mut r,
        Change::Delete {
            rel: full,
            old: OldRow::Full(row(5, "7", t("b"))),
        },
    )
    .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, pg_shard(7, 4));
}

/// `key_immutable`: with only the primary key in the identity, an UPDATE routes by its new
/// row's key and a DELETE goes to every shard; with the key in the identity (or FULL) the exact
/// path (key moves included) is kept. See: issue #12.
#[test]
fn key_immutable_routes_updates_by_the_new_row_and_deletes_everywhere() {
    let mut s = spec(4);
    s.tables = vec![(
        name("public.users"),
        TableRule {
            mode: TableMode::Sharded {
                key: "account_id".into(),
                key_immutable: true,
            },
            target: None,
        },
    )];
    let mut r = Router::new(s).unwrap();
    let users = rel(1, "users", false, ReplicaIdentity::Default);
    assert_eq!(r.validate_relation(&users), Ok(()));
    // UPDATE without an old row (the primary key did not change).
    let out = run(
        &mut r,
        Change::Update {
            rel: users.clone(),
            old: None,
            new: row(5, "7", t("b")),
        },
    )
    .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, pg_shard(7, 4));
    assert!(matches!(out[0].1, Change::Update { .. }));
    // UPDATE of the primary key: the old key row travels with it.
    let out = run(
        &mut r,
        Change::Update {
            rel: users.clone(),
            old: Some(OldRow::Key(vec![t("5"), Value::Null, Value::Null])),
            new: row(6, "7", t("b")),
        },
    )
    .unwrap();
    assert!(
        matches!(out.as_slice(), [(s, Change::Update { old: Some(OldRow::Key(_)), .. })] if *s == pg_shard(7, 4))
    );
    // DELETE by primary key: every shard, in shard order.
    let out = run(
        &mut r,
        Change::Delete {
            rel: users.clone(),
            old: OldRow::Key(vec![t("5"), Value::Null, Value::Null]),
        },
    )
    .unwrap();
    let shards: Vec<ShardId> = out.iter().map(|(s, _)| *s).collect();
    assert_eq!(shards, (0..4).map(ShardId).collect::<Vec<_>>());
    assert!(out.iter().all(|(_, c)| matches!(c, Change::Delete { .. })));
    // The key in the identity: exact routing, a key move is a delete plus an insert.
    let (a, b) = two_accounts_on_different_shards(4);
    let exact = rel(2, "users", true, ReplicaIdentity::Index);
    let out = run(
        &mut r,
        Change::Update {
            rel: exact,
            old: Some(OldRow::Key(vec![t("5"), t(&a.to_string()), Value::Null])),
            new: row(5, &b.to_string(), t("b")),
        },
    )
    .unwrap();
    assert!(
        matches!(
            out.as_slice(),
            [(s1, Change::Delete { .. }), (s2, Change::Insert { .. })]
                if *s1 == pg_shard(a, 4) && *s2 == pg_shard(b, 4)
        ),
        "{out:?}"
    );
}

#[test]
fn null_and_garbage_keys_are_named() {
    let mut r = Router::new(spec(3)).unwrap();
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let err = run(
        &mut r,
        Change::Insert {
            rel: tbl.clone(),
            new: vec![t("9"), Value::Null, t("b")],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("public.events"), "{err}");
    assert!(err.contains("account_id"), "{err}");
    assert!(err.contains("id=9"), "{err}");
    assert!(err.contains("NULL"), "{err}");
    let err = run(
        &mut r,
        Change::Insert {
            rel: tbl,
            new: vec![t("9"), t("12x"), t("b")],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"12x\" is not a valid bigint"), "{err}");
}

#[test]
fn broadcast_skip_and_unlisted_tables() {
    let mut s = spec(3);
    s.tables = vec![
        (
            name("public.countries"),
            TableRule {
                mode: TableMode::Broadcast,
                target: None,
            },
        ),
        (
            name("audit_log"),
            TableRule {
                mode: TableMode::Skip,
                target: None,
            },
        ),
    ];
    let mut r = Router::new(s.clone()).unwrap();
    let countries = rel(1, "countries", true, ReplicaIdentity::Default);
    let out = run(
        &mut r,
        Change::Insert {
            rel: countries,
            new: row(1, "1", t("x")),
        },
    )
    .unwrap();
    assert_eq!(
        out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![ShardId(0), ShardId(1), ShardId(2)]
    );
    let audit = rel(2, "audit_log", true, ReplicaIdentity::Default);
    let ins = Change::Insert {
        rel: audit.clone(),
        new: row(1, "1", t("x")),
    };
    assert!(run(&mut r, ins).unwrap().is_empty());

    // Unlisted without the default key: broadcast (Auto) or nothing (Skip).
    let lookup = Arc::new(Relation {
        id: TableId(3),
        namespace: "public".into(),
        name: "plans".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("code", 25, true)],
    });
    let ins = Change::Insert {
        rel: lookup.clone(),
        new: vec![t("gold")],
    };
    assert_eq!(run(&mut r, ins.clone()).unwrap().len(), 3);
    s.unlisted = Unlisted::Skip;
    let mut r2 = Router::new(s).unwrap();
    assert!(run(&mut r2, ins).unwrap().is_empty());
    // ...and a listed-nowhere table with the key is skipped under Unlisted::Skip too.
    let ev = rel(4, "events", true, ReplicaIdentity::Default);
    let ins = Change::Insert {
        rel: ev,
        new: row(1, "1", t("x")),
    };
    assert!(run(&mut r2, ins.clone()).unwrap().is_empty());
    assert_eq!(run(&mut r, ins).unwrap().len(), 1);
}

#[test]
fn truncate_goes_everywhere_without_skipped_tables() {
    let mut s = spec(2);
    s.tables = vec![(
        name("public.audit_log"),
        TableRule {
            mode: TableMode::Skip,
            target: None,
        },
    )];
    let mut r = Router::new(s).unwrap();
    let ev = rel(1, "events", true, ReplicaIdentity::Default);
    let audit = rel(2, "audit_log", true, ReplicaIdentity::Default);
    let out = run(
        &mut r,
        Change::Truncate {
            rels: vec![ev.clone(), audit.clone()],
            cascade: true,
            restart_identity: false,
        },
    )
    .unwrap();
    let want = Change::Truncate {
        rels: vec![ev],
        cascade: true,
        restart_identity: false,
    };
    assert_eq!(out, vec![(ShardId(0), want.clone()), (ShardId(1), want)]);
    let out = run(
        &mut r,
        Change::Truncate {
            rels: vec![audit],
            cascade: false,
            restart_identity: false,
        },
    )
    .unwrap();
    assert!(out.is_empty());
    let msg = Change::Message {
        prefix: "p".into(),
        content: Bytes::from_static(b"x"),
    };
    assert!(run(&mut r, msg).unwrap().is_empty());
    // The cutover marker reaches every shard (its transaction moves their progress).
    let marker = Change::Message {
        prefix: crate::event::CUTOVER_MESSAGE_PREFIX.into(),
        content: Bytes::from_static(b"shard1"),
    };
    assert_eq!(
        run(&mut r, marker.clone()).unwrap(),
        vec![(ShardId(0), marker.clone()), (ShardId(1), marker)]
    );
}

#[test]
fn validate_names_missing_and_unsupported_key_columns() {
    let r = Router::new(spec(2)).unwrap();
    let mut s = spec(2);
    s.tables = vec![(
        name("public.orders"),
        TableRule {
            mode: TableMode::Sharded {
                key: "tenant".into(),
                key_immutable: false,
            },
            target: None,
        },
    )];
    let r2 = Router::new(s).unwrap();
    let orders = rel(1, "orders", true, ReplicaIdentity::Default);
    let err = r2.validate_relation(&orders).unwrap_err().to_string();
    assert!(err.contains("public.orders has no column tenant"), "{err}");
    let numeric = Relation {
        id: TableId(2),
        namespace: "public".into(),
        name: "n".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("account_id", 1700, true)],
    };
    let err = r.validate_relation(&numeric).unwrap_err().to_string();
    assert!(err.contains("type OID 1700"), "{err}");
    assert!(err.contains("hash = \"map\""), "{err}");
}

#[test]
fn account_map_routing_and_unknown_accounts() {
    let shards: Vec<String> = vec!["eu".into(), "us".into()];
    let map = AccountMap::from_pairs(
        &shards,
        vec![("1".into(), "us".into()), ("2".into(), "eu".into())],
    )
    .unwrap();
    let mut s = spec(2);
    s.shards = shards.clone();
    s.hash = HashKind::Map(Arc::new(map.clone()));
    let mut r = Router::new(s.clone()).unwrap();
    let ev = rel(1, "events", true, ReplicaIdentity::Default);
    let out = run(
        &mut r,
        Change::Insert {
            rel: ev.clone(),
            new: row(1, "1", t("x")),
        },
    )
    .unwrap();
    assert_eq!(out[0].0, ShardId(1));
    let err = run(
        &mut r,
        Change::Insert {
            rel: ev.clone(),
            new: row(1, "3", t("x")),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("account \"3\" is not in the account map"),
        "{err}"
    );
    assert!(err.contains("public.events"), "{err}");
    s.hash = HashKind::Map(Arc::new(map.with_default("eu").unwrap()));
    let mut r = Router::new(s.clone()).unwrap();
    let out = run(
        &mut r,
        Change::Insert {
            rel: ev,
            new: row(1, "3", t("x")),
        },
    )
    .unwrap();
    assert_eq!(out[0].0, ShardId(0));
    // A map built for other shards is refused.
    s.shards = vec!["eu".into(), "us".into(), "ap".into()];
    assert!(matches!(Router::new(s), Err(RouteError::Config(_))));
}

#[test]
fn config_is_validated() {
    let mut s = spec(2);
    s.shards = vec!["a".into(), "a".into()];
    assert!(Router::new(s)
        .unwrap_err()
        .to_string()
        .contains("used twice"));
    let mut s = spec(2);
    s.shards.clear();
    assert!(Router::new(s).is_err());
    let mut s = spec(2);
    s.tables = vec![
        (
            name("t"),
            TableRule {
                mode: TableMode::Broadcast,
                target: None,
            },
        ),
        (
            name("public.t"),
            TableRule {
                mode: TableMode::Skip,
                target: None,
            },
        ),
    ];
    assert!(Router::new(s)
        .unwrap_err()
        .to_string()
        .contains("public.t is configured twice"));
}

#[test]
fn copy_fields_route_like_pgoutput_text() {
    let r = Router::new(spec(5)).unwrap();
    let tbl = Relation {
        id: TableId(1),
        namespace: "public".into(),
        name: "docs".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("id", 20, true), col("account_id", 25, true)],
    };
    let TableRoute::Sharded(key) = r.table_route(&tbl).unwrap() else {
        panic!("docs is sharded");
    };
    assert_eq!(key.column_index, 1);
    // COPY prints a tab inside a text key as `\t`; the shard is that of the real text.
    let via_copy = r.shard_of_copy_field(&key, br"a\tb").unwrap();
    let via_text = r.shard_of_text(25, b"a\tb").unwrap();
    assert_eq!(via_copy, via_text);
    let err = r.shard_of_copy_field(&key, br"\N").unwrap_err().to_string();
    assert!(err.contains("public.docs") && err.contains("NULL"), "{err}");
    // PostgreSQL 15: text 'acct-1001' is in REMAINDER 0 of MODULUS 5, 'a' in REMAINDER 2.
    assert_eq!(
        r.shard_of_copy_field(&key, b"acct-1001").unwrap(),
        ShardId(0)
    );
    assert_eq!(r.shard_of_text(25, b"a").unwrap(), ShardId(2));
}

#[test]
fn binary_keys_route_like_text_keys() {
    let mut r = Router::new(spec(7)).unwrap();
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let bin = vec![
        t("1"),
        Value::Binary(Bytes::copy_from_slice(&123_456_789_i64.to_be_bytes())),
        t("x"),
    ];
    let a = run(
        &mut r,
        Change::Insert {
            rel: tbl.clone(),
            new: bin,
        },
    )
    .unwrap();
    let b = run(
        &mut r,
        Change::Insert {
            rel: tbl,
            new: row(1, "123456789", t("x")),
        },
    )
    .unwrap();
    assert_eq!(a[0].0, b[0].0);
}

#[test]
fn relation_change_is_picked_up() {
    let mut s = spec(4);
    s.tables = vec![(
        name("public.events"),
        TableRule {
            mode: TableMode::Sharded {
                key: "account_id".into(),
                key_immutable: false,
            },
            target: None,
        },
    )];
    let mut r = Router::new(s).unwrap();
    let v1 = rel(1, "events", true, ReplicaIdentity::Default);
    run(
        &mut r,
        Change::Insert {
            rel: v1,
            new: row(1, "1", t("x")),
        },
    )
    .unwrap();
    // Same OID, the key column was renamed: the cached plan must not be reused.
    let v2 = Arc::new(Relation {
        columns: vec![
            col("id", 20, true),
            col("acct", 20, true),
            col("body", 25, false),
        ],
        ..(*rel(1, "events", true, ReplicaIdentity::Default)).clone()
    });
    let err = run(
        &mut r,
        Change::Insert {
            rel: v2,
            new: row(1, "1", t("x")),
        },
    )
    .unwrap_err();
    assert!(matches!(err, RouteError::MissingKeyColumn { .. }));
}

#[test]
fn row_shape_mismatch_is_an_error_not_a_panic() {
    let mut r = Router::new(spec(2)).unwrap();
    let tbl = rel(1, "events", true, ReplicaIdentity::Default);
    let err = run(
        &mut r,
        Change::Insert {
            rel: tbl,
            new: vec![t("1")],
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        RouteError::RowShape {
            got: 1,
            want: 3,
            ..
        }
    ));
}

/// The table a config-style name spells.
fn name(text: &str) -> crate::pg::sql::TableName {
    crate::pg::sql::TableName::parse(text).unwrap()
}
