-- A small schema for the compose stack, applied to the source and to every shard by the
-- postgres image's /docker-entrypoint-initdb.d. Replace it with your own schema: reshard
-- copies data, not DDL, so every shard needs the target tables before `reshard run`.

CREATE TABLE public.plans (
    plan_id   int PRIMARY KEY,
    name      text NOT NULL
);

CREATE TABLE public.accounts (
    account_id bigint PRIMARY KEY,
    plan_id    int NOT NULL,
    name       text NOT NULL
);

CREATE TABLE public.events (
    account_id bigint NOT NULL,
    event_id   bigint NOT NULL,
    kind       text NOT NULL,
    payload    jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, event_id)
);
