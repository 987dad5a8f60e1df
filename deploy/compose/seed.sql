-- Source only: a few rows so that the full load has something to copy.
INSERT INTO public.plans VALUES (1, 'free'), (2, 'pro');
INSERT INTO public.accounts
SELECT a, 1 + a % 2, 'account ' || a FROM generate_series(1, 100) a;
INSERT INTO public.events (account_id, event_id, kind, payload)
SELECT 1 + e % 100, e, 'signup', jsonb_build_object('n', e) FROM generate_series(1, 10000) e;
