//! Routing agrees with PostgreSQL's own hash partitioning, row for row.
//!
//! For every supported key type, a real server routes 65k–100k+ values (integer extremes, 0,
//! -1, random 64-bit values, the empty string, strings of every length up to 300 bytes and a
//! few of 3–5 kB, unicode, COPY-escaped characters, random uuids) into
//! `PARTITION BY HASH (k)` tables with MODULUS 2, 3, 4, 5 and 8. We read every row back as
//! `COPY (SELECT k, tableoid::regclass …) TO STDOUT` and assert that the router picks the
//! partition's REMAINDER for every row, both from the raw COPY field (the full-load path) and
//! from the unescaped text value (the CDC path, `Router::route`).

use std::sync::Arc;

use bytes::Bytes;
use reshard_engine::event::{Change, Column, Relation, ReplicaIdentity, ShardId, TableId, Value};
use reshard_engine::route::key::{is_copy_null, unescape_copy_field};
use reshard_engine::route::{
    HashKind, RouteSpec, Router, TableMode, TableRoute, TableRule, Unlisted,
};
use reshard_harness::PgCluster;

const MODULI: [usize; 5] = [2, 3, 4, 5, 8];

/// One key type: its SQL type, `pg_type` OID, and a query producing the values as column `v`.
struct Case {
    name: &'static str,
    sql_type: &'static str,
    type_oid: u32,
    values: &'static str,
}

const INT8: &str = "
    SELECT v::int8 FROM unnest(ARRAY[-9223372036854775808, 9223372036854775807, 0, -1, 1,
        2147483647, 2147483648, -2147483648, -2147483649, 4294967295, 4294967296,
        -4294967296, 32767, -32768]::int8[]) v
    UNION ALL SELECT g FROM generate_series(-20000, 20000) g
    UNION ALL SELECT ('x' || md5(g::text))::bit(64)::int8 FROM generate_series(1, 60000) g";

const INT4: &str = "
    SELECT v FROM unnest(ARRAY[-2147483648, 2147483647, 0, -1, 1, 32767, -32768, 65536]) v
    UNION ALL SELECT g FROM generate_series(-20000, 20000) g
    UNION ALL SELECT ('x' || md5(g::text))::bit(32)::int4 FROM generate_series(1, 60000) g";

const INT2: &str = "SELECT g::int2 FROM generate_series(-32768, 32767) g";

const TEXT: &str = "
    SELECT v FROM unnest(ARRAY['', ' ', 'a', E'tab\\there', E'back\\\\slash', E'new\\nline',
        E'cr\\rx', E'\\\\N', 'quote''s', ' lead', 'trail ', 'Grüße, 世界 🎉',
        repeat('x', 5000)]) v
    UNION ALL SELECT substr(repeat(md5(g::text), 10), 1, g % 300) FROM generate_series(1, 50000) g
    UNION ALL SELECT md5(g::text) || chr(160 + g % 20000) || 'ü€😀' FROM generate_series(1, 30000) g
    UNION ALL SELECT g::text FROM generate_series(1, 20000) g
    UNION ALL SELECT repeat(md5(g::text), 100) FROM generate_series(1, 1000) g";

const BPCHAR: &str = "
    SELECT v FROM unnest(ARRAY['', ' ', 'a', 'a  ', '  a', 'Grüße, 世界 🎉', E'tab\\t']) v
    UNION ALL SELECT substr(md5(g::text) || md5(g::text), 1, g % 50) FROM generate_series(1, 60000) g
    UNION ALL SELECT substr(md5(g::text), 1, g % 20) || ' ' || chr(160 + g % 20000)
        FROM generate_series(1, 40000) g";

const UUID: &str = "
    SELECT v::uuid FROM unnest(ARRAY['00000000-0000-0000-0000-000000000000',
        'ffffffff-ffff-ffff-ffff-ffffffffffff', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11']) v
    UNION ALL SELECT md5(g::text)::uuid FROM generate_series(1, 100000) g
    UNION ALL SELECT gen_random_uuid() FROM generate_series(1, 2000) g";

const CASES: [Case; 7] = [
    Case {
        name: "int8",
        sql_type: "bigint",
        type_oid: 20,
        values: INT8,
    },
    Case {
        name: "int4",
        sql_type: "integer",
        type_oid: 23,
        values: INT4,
    },
    Case {
        name: "int2",
        sql_type: "smallint",
        type_oid: 21,
        values: INT2,
    },
    Case {
        name: "text",
        sql_type: "text",
        type_oid: 25,
        values: TEXT,
    },
    Case {
        name: "varchar",
        sql_type: "varchar(5000)",
        type_oid: 1043,
        values: TEXT,
    },
    Case {
        name: "bpchar",
        sql_type: "char(50)",
        type_oid: 1042,
        values: BPCHAR,
    },
    Case {
        name: "uuid",
        sql_type: "uuid",
        type_oid: 2950,
        values: UUID,
    },
];

fn router(n: usize) -> Router {
    Router::new(RouteSpec {
        shards: (0..n).map(|i| format!("shard{i}")).collect(),
        tables: vec![(
            reshard_engine::pg::sql::TableName::new("public", "p"),
            TableRule {
                mode: TableMode::Sharded {
                    key: "k".into(),
                    key_immutable: false,
                },
                target: None,
            },
        )],
        default_key: "account_id".into(),
        hash: HashKind::Postgres,
        unlisted: Unlisted::Skip,
    })
    .expect("valid routing spec")
}

fn relation(type_oid: u32) -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(16_384),
        namespace: "public".into(),
        name: "p".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![Column {
            name: "k".into(),
            type_oid,
            type_modifier: -1,
            is_key: true,
        }],
    })
}

/// Creates `p_<case>_<n>` with `n` hash partitions `p_<case>_<n>_<remainder>` and fills it.
fn setup_sql(case: &Case) -> String {
    let mut sql = format!(
        "CREATE UNLOGGED TABLE v_{c} AS SELECT v::{t} AS v FROM ({q}) s(v);",
        c = case.name,
        t = case.sql_type,
        q = case.values
    );
    for n in MODULI {
        sql.push_str(&format!(
            "CREATE TABLE p_{c}_{n} (k {t}) PARTITION BY HASH (k);
             DO $$ BEGIN FOR r IN 0..{n} - 1 LOOP
               EXECUTE format('CREATE UNLOGGED TABLE p_{c}_{n}_%s PARTITION OF p_{c}_{n}
                               FOR VALUES WITH (MODULUS {n}, REMAINDER %s)', r, r);
             END LOOP; END $$;
             INSERT INTO p_{c}_{n} SELECT v FROM v_{c};",
            c = case.name,
            t = case.sql_type,
        ));
    }
    sql
}

#[test]
fn router_matches_postgres_hash_partitions_for_every_key_type() {
    let pg = PgCluster::start().expect("start PostgreSQL");
    for case in &CASES {
        pg.psql("postgres", &setup_sql(case))
            .unwrap_or_else(|e| panic!("setting up {}: {e}", case.name));
        let rel = relation(case.type_oid);
        let expected: usize = pg
            .psql("postgres", &format!("SELECT count(*) FROM v_{}", case.name))
            .expect("count")
            .parse()
            .expect("a count");
        for n in MODULI {
            let mut r = router(n);
            let TableRoute::Sharded(key) = r.table_route(&rel).expect("table route") else {
                panic!("p is configured as sharded");
            };
            let copy = pg
                .psql(
                    "postgres",
                    &format!(
                        "COPY (SELECT k, tableoid::regclass FROM p_{}_{n}) TO STDOUT",
                        case.name
                    ),
                )
                .expect("COPY out");
            let prefix = format!("p_{}_{n}_", case.name);
            let mut rows = 0usize;
            let mut per_shard = vec![0usize; n];
            let mut mismatches = Vec::new();
            for line in copy.lines() {
                let (field, part) = line.rsplit_once('\t').expect("two COPY fields");
                let want: u16 = part
                    .strip_prefix(&prefix)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected partition {part}"));
                let want = ShardId(want);
                assert!(
                    !is_copy_null(field.as_bytes()),
                    "no NULL keys were inserted"
                );

                // Full-load path: the raw COPY field.
                let got_copy = r
                    .shard_of_copy_field(&key, field.as_bytes())
                    .unwrap_or_else(|e| panic!("{} {field:?}: {e}", case.name));
                // CDC path (pgoutput sends the unescaped text form), for the largest modulus
                // only: it shares the hashing with the COPY path, and the test binary is
                // unoptimized.
                let mut got_cdc = Some(want);
                if n == MODULI[MODULI.len() - 1] {
                    let text = unescape_copy_field(field.as_bytes()).into_owned();
                    got_cdc = None;
                    r.route(
                        Change::Insert {
                            rel: rel.clone(),
                            new: vec![Value::Text(Bytes::from(text))],
                        },
                        &mut |s, _| got_cdc = Some(s),
                    )
                    .unwrap_or_else(|e| panic!("{} {field:?}: {e}", case.name));
                }

                if got_copy != want || got_cdc != Some(want) {
                    mismatches.push(format!(
                        "{field:?}: postgres {want}, copy path {got_copy}, cdc path {got_cdc:?}"
                    ));
                }
                per_shard[want.index()] += 1;
                rows += 1;
            }
            assert_eq!(rows, expected, "{} MODULUS {n}: rows read back", case.name);
            assert!(
                per_shard.iter().all(|&c| c > expected / n / 2),
                "{} MODULUS {n}: PostgreSQL spread {per_shard:?} unevenly",
                case.name
            );
            assert!(
                mismatches.is_empty(),
                "{} MODULUS {n}: {} of {rows} rows routed differently from PostgreSQL, e.g.\n{}",
                case.name,
                mismatches.len(),
                mismatches
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// An account directory exported by PostgreSQL itself (`COPY … WITH (FORMAT csv, HEADER)`,
/// which quotes ids holding commas or quotes) loads into an `AccountMap`, and every account
/// routes to the shard the directory names: by exact text for a text key, by value for integer
/// and uuid keys (whatever spelling the directory used).
#[test]
fn account_map_loads_a_postgres_csv_export() {
    use reshard_engine::route::AccountMap;

    let pg = PgCluster::start().expect("start PostgreSQL");
    pg.psql(
        "postgres",
        "CREATE TABLE directory (account_id text PRIMARY KEY, shard text NOT NULL);
         INSERT INTO directory
           SELECT 'acct-' || g, 'shard' || (g % 3) FROM generate_series(1, 3000) g
           UNION ALL SELECT g::text, 'shard' || (g % 3) FROM generate_series(1, 3000) g
           UNION ALL SELECT upper(md5(g::text)::uuid::text), 'shard' || (g % 3)
                     FROM generate_series(1, 3000) g
           UNION ALL VALUES ('acme, inc', 'shard1'), ('say \"hi\"', 'shard2'),
                            ('Grüße', 'shard2');",
    )
    .expect("directory");
    let csv = pg
        .psql(
            "postgres",
            "COPY (SELECT account_id, shard FROM directory ORDER BY account_id)
             TO STDOUT WITH (FORMAT csv, HEADER)",
        )
        .expect("csv export");
    assert!(csv.contains("\"acme, inc\""), "PostgreSQL quotes the comma");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("accounts.csv");
    std::fs::write(&path, format!("# exported by COPY\n{csv}\n")).expect("write csv");

    let shards: Vec<String> = (0..3).map(|i| format!("shard{i}")).collect();
    let map = Arc::new(AccountMap::from_csv_path(&path, &shards).expect("load the export"));
    assert_eq!(map.len(), 9003);

    let spec = |key_oid: u32| {
        let r = Router::new(RouteSpec {
            shards: shards.clone(),
            tables: vec![],
            default_key: "k".into(),
            hash: HashKind::Map(map.clone()),
            unlisted: Unlisted::Auto,
        })
        .expect("spec");
        (r, relation(key_oid))
    };
    let expected = pg
        .psql(
            "postgres",
            "SELECT account_id, substr(shard, 6) FROM directory",
        )
        .expect("directory rows");
    let (mut text_router, text_rel) = spec(25);
    let (mut int_router, int_rel) = spec(20);
    let (mut uuid_router, uuid_rel) = spec(2950);
    let mut checked = [0usize; 3];
    for line in expected.lines() {
        let (account, shard) = line.rsplit_once('|').expect("two columns");
        let want = ShardId(shard.parse().expect("shard number"));
        let route = |r: &mut Router, rel: &Arc<Relation>, key: String| {
            let mut got = None;
            r.route(
                Change::Insert {
                    rel: rel.clone(),
                    new: vec![Value::Text(Bytes::from(key))],
                },
                &mut |s, _| got = Some(s),
            )
            .unwrap_or_else(|e| panic!("{account:?}: {e}"));
            got
        };
        assert_eq!(
            route(&mut text_router, &text_rel, account.to_owned()),
            Some(want)
        );
        checked[0] += 1;
        if account.bytes().all(|b| b.is_ascii_digit()) {
            // An integer key arrives as PostgreSQL prints it.
            assert_eq!(
                route(&mut int_router, &int_rel, account.to_owned()),
                Some(want)
            );
            checked[1] += 1;
        }
        if account.len() == 36 && account.contains('-') {
            // A uuid key arrives in lower case, the directory spelled it in upper case.
            let canonical = account.to_ascii_lowercase();
            assert_eq!(route(&mut uuid_router, &uuid_rel, canonical), Some(want));
            checked[2] += 1;
        }
    }
    assert_eq!(checked, [9003, 3000, 3000]);

    // An account the directory does not list is an error naming it and the table.
    let err = int_router
        .route(
            Change::Insert {
                rel: int_rel,
                new: vec![Value::Text(Bytes::from_static(b"999999"))],
            },
            &mut |_, _| panic!("nothing may be emitted"),
        )
        .expect_err("unmapped account");
    let msg = err.to_string();
    assert!(
        msg.contains("\"999999\"") && msg.contains("public.p"),
        "{msg}"
    );
}
