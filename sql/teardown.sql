-- synapse-account-data-relay teardown for a stock Synapse database, default names.
-- Generated from the same plan `synapse-account-data-relay teardown --dry-run` prints for your database;
-- prefer that command, which adapts to what it finds. Run as the owner of Synapse's tables
-- (Synapse's database role) connected to Synapse's database, e.g. `psql -U synapse -d synapse -f teardown.sql`.
-- Stop the relay first.
-- drop replication slot "synapse_account_data_relay" (PostgreSQL stops retaining WAL for it)
SELECT pg_drop_replication_slot('synapse_account_data_relay');
-- wait at most 100ms for table locks
SET lock_timeout = '100ms';
BEGIN;
-- drop publication "synapse_account_data_relay" (before touching replica identities)
DROP PUBLICATION "synapse_account_data_relay";
-- drop publication "synapse_account_data_relay_push_rules"
DROP PUBLICATION "synapse_account_data_relay_push_rules";
-- drop the relay's state schema "synapse_account_data_relay" and the keys it holds
DROP SCHEMA "synapse_account_data_relay" CASCADE;
-- restore account_data's replica identity to default
ALTER TABLE "account_data" REPLICA IDENTITY DEFAULT;
-- restore room_account_data's replica identity to default
ALTER TABLE "room_account_data" REPLICA IDENTITY DEFAULT;
-- restore room_tags_revisions's replica identity to default
ALTER TABLE "room_tags_revisions" REPLICA IDENTITY DEFAULT;
COMMIT;
