-- A database shaped like the application's: users, lessons, progress, direct messages with
-- Korean text, jsonb settings, bytea attachments, numeric scores, timestamps, indexes and FKs.
-- :scale is rows per "unit"; 1 unit is roughly 1 MB on disk. Generated server-side.
SET client_min_messages = warning;
DROP TABLE IF EXISTS attachments, direct_messages, progress, lessons, users CASCADE;
CREATE TABLE users (
  id bigint PRIMARY KEY, email text NOT NULL, display_name text NOT NULL, settings jsonb NOT NULL,
  level smallint NOT NULL, points numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, last_seen timestamptz);
CREATE TABLE lessons (
  id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL, level smallint NOT NULL,
  tags jsonb NOT NULL, published_at timestamptz NOT NULL);
CREATE TABLE progress (
  user_id bigint NOT NULL REFERENCES users(id), lesson_id bigint NOT NULL REFERENCES lessons(id),
  score numeric(5,2) NOT NULL, attempts int NOT NULL, completed_at timestamptz, PRIMARY KEY (user_id, lesson_id));
CREATE TABLE direct_messages (
  id bigint PRIMARY KEY, sender_id bigint NOT NULL REFERENCES users(id), recipient_id bigint NOT NULL REFERENCES users(id),
  body text NOT NULL, sent_at timestamptz NOT NULL, read_at timestamptz);
CREATE TABLE attachments (
  id bigint PRIMARY KEY, message_id bigint NOT NULL REFERENCES direct_messages(id), mime text NOT NULL, data bytea NOT NULL);

CREATE TEMP TABLE phrases(i int, p text);
INSERT INTO phrases VALUES (0,'안녕하세요'),(1,'감사합니다'),(2,'오늘 수업 어땠어요?'),(3,'숙제 다 했어요'),
 (4,'한국어 공부는 재미있어요'),(5,'내일 봐요!'),(6,'발음이 많이 좋아졌네요'),(7,'이 문법이 헷갈려요'),
 (8,'시험 잘 봤어요?'),(9,'주말에 뭐 해요?'),(10,'김치찌개를 좋아해요'),(11,'서울에 가고 싶어요');

INSERT INTO users
SELECT g, 'user' || g || '@example.com', '학생_' || g || '_' || substr(md5(g::text), 1, 6),
       jsonb_build_object('lang', (ARRAY['ko','en','ja','vi'])[1 + g % 4], 'notifications', g % 3 = 0,
                          'theme', (ARRAY['light','dark'])[1 + g % 2], 'goal_minutes', 5 + g % 55),
       (g % 6)::smallint, round((random() * 100000)::numeric, 2),
       timestamptz '2023-01-01' + (g % 100000) * interval '5 minutes', now() - (g % 1000) * interval '1 hour'
FROM generate_series(1, :scale * 20) g;

INSERT INTO lessons
SELECT g, '제' || g || '과: ' || (SELECT p FROM phrases WHERE i = g % 12),
       (SELECT string_agg(p, ' ') FROM phrases, generate_series(1, 6) r WHERE (i + r + g) % 3 = 0),
       (g % 6)::smallint, jsonb_build_array('grammar', 'level' || (g % 6), 'unit' || (g % 40)),
       timestamptz '2022-06-01' + g * interval '1 day'
FROM generate_series(1, GREATEST(:scale / 2, 50)) g;

INSERT INTO progress
SELECT u, l, round((random() * 100)::numeric, 2), 1 + (u + l) % 5,
       CASE WHEN (u + l) % 4 = 0 THEN NULL ELSE now() - ((u * l) % 5000) * interval '1 minute' END
FROM generate_series(1, :scale * 20) u, generate_series(1, 10) l
WHERE l <= GREATEST(:scale / 2, 50);

INSERT INTO direct_messages
SELECT g, 1 + g % (:scale * 20), 1 + (g * 7) % (:scale * 20),
       (SELECT p FROM phrases WHERE i = g % 12) || ' ' || (SELECT p FROM phrases WHERE i = (g / 12) % 12) || ' #' || g,
       timestamptz '2024-01-01' + g * interval '13 seconds',
       CASE WHEN g % 3 = 0 THEN NULL ELSE timestamptz '2024-01-01' + g * interval '13 seconds' + interval '5 minutes' END
FROM generate_series(1, :scale * 60) g;

-- attachments: small images are incompressible, a realistic worst case for compressors
INSERT INTO attachments
SELECT g, 1 + (g * 11) % (:scale * 60), (ARRAY['image/png','image/jpeg','application/pdf'])[1 + g % 3],
       (SELECT decode(string_agg(md5(random()::text || g::text || r::text), ''), 'hex') FROM generate_series(1, 64) r)
FROM generate_series(1, :scale * 2) g;

CREATE INDEX ON direct_messages (sender_id, sent_at);
CREATE INDEX ON direct_messages (recipient_id);
CREATE INDEX ON progress (lesson_id);
CREATE INDEX ON users (email);
ANALYZE;
