-- synapse-account-data-relay setup for a stock Synapse database, default names.
-- Generated from the same plan `synapse-account-data-relay setup --dry-run` prints for your database;
-- prefer that command, which adapts to what it finds. Run as the owner of Synapse's tables
-- (Synapse's database role) connected to Synapse's database, e.g. `psql -U synapse -d synapse -f setup.sql`.
-- Prerequisites: wal_level = logical (needs a restart), and the role has REPLICATION:
--   ALTER SYSTEM SET wal_level = logical;   -- then restart PostgreSQL
--   ALTER ROLE synapse WITH REPLICATION;     -- as a superuser
-- wait at most 100ms for table locks, so Synapse's writes never queue behind setup for longer (setup tries again; by hand, run the file again if a lock timeout stops it)
SET lock_timeout = '100ms';
BEGIN;
-- give account_data a replica identity (its unique index) BEFORE it enters a publication, so Synapse's updates keep working
ALTER TABLE "account_data" REPLICA IDENTITY USING INDEX "account_data_uniqueness";
-- give room_account_data a replica identity (its unique index) BEFORE it enters a publication, so Synapse's updates keep working
ALTER TABLE "room_account_data" REPLICA IDENTITY USING INDEX "room_account_data_uniqueness";
-- give room_tags_revisions a replica identity (its unique index) BEFORE it enters a publication, so Synapse's updates keep working
ALTER TABLE "room_tags_revisions" REPLICA IDENTITY USING INDEX "room_tag_revisions_uniqueness";
-- create publication "synapse_account_data_relay" for the three account-data tables
CREATE PUBLICATION "synapse_account_data_relay" FOR TABLE "account_data", "room_account_data", "room_tags_revisions" WITH (publish = 'insert, update, truncate');
-- record each table's replica identity before setup, for teardown to restore
COMMENT ON PUBLICATION "synapse_account_data_relay" IS 'synapse-account-data-relay; replica identity before setup: account_data=default room_account_data=default room_tags_revisions=default';
-- create publication "synapse_account_data_relay_push_rules" for push_rules_stream, publishing inserts only (the table has no key and needs no replica identity for that)
CREATE PUBLICATION "synapse_account_data_relay_push_rules" FOR TABLE "push_rules_stream" WITH (publish = 'insert');
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
CREATE SCHEMA IF NOT EXISTS "synapse_account_data_relay";
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
COMMENT ON SCHEMA "synapse_account_data_relay" IS 'synapse-account-data-relay state: recorded keys to resync (dropped by teardown)';
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
CREATE TABLE IF NOT EXISTS "synapse_account_data_relay".pending_keys (appservice_id text NOT NULL, user_id text NOT NULL, room_id text NOT NULL, data_type text NOT NULL, version bigint NOT NULL, PRIMARY KEY (appservice_id, user_id, room_id, data_type));
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
CREATE SEQUENCE IF NOT EXISTS "synapse_account_data_relay".pending_key_version;
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
CREATE TABLE IF NOT EXISTS "synapse_account_data_relay".appservices (appservice_id text PRIMARY KEY, first_served timestamptz NOT NULL DEFAULT now());
-- create the relay's state schema "synapse_account_data_relay" (keys to resync for appservices that are down)
CREATE TABLE IF NOT EXISTS "synapse_account_data_relay".backfills (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, appservice_id text NOT NULL, users_regex text, phase smallint NOT NULL DEFAULT 0, after_user text NOT NULL DEFAULT '', after_room text NOT NULL DEFAULT '', after_type text NOT NULL DEFAULT '', keys_sent bigint NOT NULL DEFAULT 0, requested timestamptz NOT NULL DEFAULT now());
COMMIT;
-- create logical replication slot "synapse_account_data_relay" with pgoutput (after the publication: a slot cannot decode changes made before a publication it is asked for existed)
SELECT pg_create_logical_replication_slot('synapse_account_data_relay', 'pgoutput');
